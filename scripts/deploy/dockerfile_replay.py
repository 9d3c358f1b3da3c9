#!/usr/bin/env python3
"""Replays the build stages of a Dockerfile without a container engine, to catch a build stage that
misses files (a source file, an include_str! target, a workspace member) before anyone runs `docker build`.

    dockerfile_replay.py [--mode check|build] [--keep] DOCKERFILE CONTEXT

It reads the stages the final stage copies from (`COPY --from=NAME`) and their `FROM` chain, then, in a
fresh temporary directory standing in for the image's file system, replays exactly their WORKDIR, ENV,
ARG, COPY and RUN instructions: COPY takes the paths from the build context with .dockerignore applied
(as Docker does: the last matching pattern wins, `!` re-includes, a pattern also excludes what lies
under a matching directory), and RUN runs in bash with the stage's WORKDIR as the current directory.

What differs from a real image build, on purpose:
  * absolute paths under the stages' WORKDIRs (e.g. /src/target/...) are rewritten into the temporary
    directory, the only rewrite of a command;
  * cargo runs offline from the host's registry cache (CARGO_NET_OFFLINE) with the host's toolchain,
    and with no inherited CARGO_TARGET_DIR, so it builds into the temporary directory like the image;
  * --mode check (the default) puts a `cargo` first on PATH that runs `cargo check` where the
    Dockerfile says `cargo build`, with the release profile at opt-level 0 and no debug info (build
    scripts still compile C): every source file and include_str! target must be present for that, and
    it takes a fraction of a release build. --mode build runs the real release build;
  * the base image's own contents are not there (the host's toolchain stands in for rust:*), and the
    final stage (FROM an image we cannot pull) is not run: its COPY --from sources are checked to exist
    in --mode build only.
The temporary directory (and with it the build's target directory) is deleted afterwards unless --keep.
With --cache DIR the file system after each RUN of a stage other than the last one is saved under a key
of everything that led to it (instructions, mode, copied files' names and contents), and a later replay
with the same key restores it instead of running it again: Docker's layer cache, so that a second
replay of a Dockerfile whose dependency stage did not change costs only its last stage.
Exit status 1 when an instruction fails.
"""
import argparse
import fnmatch
import hashlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time


def logical_lines(text):
    """Dockerfile lines with `\\` continuations joined and comments dropped."""
    out, cur = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if not cur and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if cur and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if line.endswith("\\"):
            cur += line[:-1] + " "
            continue
        out.append((cur + line).strip())
        cur = ""
    if cur:
        out.append(cur.strip())
    return out


def parse_stages(text):
    """[(name, base, [(INSTRUCTION, args)])] in order, with global ARG defaults substituted in FROM."""
    global_args, stages = {}, []
    for line in logical_lines(text):
        instr, _, args = line.partition(" ")
        instr = instr.upper()
        if instr == "ARG" and not stages:
            k, _, v = args.partition("=")
            global_args[k.strip()] = v.strip()
            continue
        if instr == "FROM":
            words = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args.get(m.group(1) or m.group(2), ""),
                           args).split()
            words = [w for w in words if not w.startswith("--platform")]
            name = words[2] if len(words) >= 3 and words[1].upper() == "AS" else str(len(stages))
            stages.append((name, words[0], []))
            continue
        if not stages:
            sys.exit(f"{instr} before the first FROM")
        stages[-1][2].append((instr, args))
    return stages


class DockerIgnore:
    """The build context's .dockerignore, with Docker's matching rules."""

    def __init__(self, path):
        self.rules = []
        if os.path.exists(path):
            for line in open(path):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                neg = line.startswith("!")
                pat = os.path.normpath(line[1:] if neg else line).lstrip("/")
                self.rules.append((neg, re.compile(self._regex(pat))))

    @staticmethod
    def _regex(pat):
        out, i = "", 0
        while i < len(pat):
            if pat.startswith("**/", i):
                out, i = out + "(?:.*/)?", i + 3
            elif pat.startswith("**", i):
                out, i = out + ".*", i + 2
            elif pat[i] == "*":
                out, i = out + "[^/]*", i + 1
            elif pat[i] == "?":
                out, i = out + "[^/]", i + 1
            else:
                out, i = out + re.escape(pat[i]), i + 1
        return f"^{out}$"

    def ignored(self, rel):
        """True when `rel` (a path relative to the context) is left out of the context."""
        parts = rel.split("/")
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        result = False
        for neg, rx in self.rules:
            if any(rx.match(c) for c in candidates):
                result = not neg
        return result


def copy_into(context, ignore, sources, dest, root, digest):
    """COPY SOURCES DEST: each source (a path or glob in the context) into DEST under ROOT; the names and
    contents of what is copied go into DIGEST."""
    multiple = len(sources) > 1
    for src in sources:
        matches = sorted(fnmatch.filter(_context_paths(context, os.path.dirname(src) or "."),
                                        os.path.normpath(src))) if any(c in src for c in "*?[") else [os.path.normpath(src)]
        matches = [m for m in matches if os.path.lexists(os.path.join(context, m)) and not ignore.ignored(m)]
        if not matches:
            raise FileNotFoundError(f"COPY {src}: not in the build context (missing, or left out by .dockerignore)")
        for m in matches:
            full = os.path.join(context, m)
            if os.path.isdir(full):
                # A directory's contents go to DEST (Docker copies the contents, not the directory).
                for dirpath, dirnames, filenames in os.walk(full):
                    reldir = os.path.relpath(dirpath, context)
                    dirnames[:] = [d for d in dirnames if not ignore.ignored(os.path.join(reldir, d))]
                    for f in filenames:
                        rel = os.path.normpath(os.path.join(reldir, f))
                        if ignore.ignored(rel):
                            continue
                        target = os.path.join(root, dest, os.path.relpath(rel, m))
                        _copy_file(os.path.join(context, rel), target, digest)
            else:
                into_dir = dest.endswith("/") or multiple
                target = os.path.join(root, dest, os.path.basename(m)) if into_dir else os.path.join(root, dest)
                _copy_file(full, target, digest)


def _copy_file(src, target, digest):
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copy2(src, target)
    digest.update(target.encode() + b"\0")
    with open(src, "rb") as f:
        digest.update(hashlib.sha256(f.read()).digest())


def _context_paths(context, reldir):
    d = os.path.join(context, reldir)
    return [os.path.normpath(os.path.join(reldir, n)) for n in os.listdir(d)] if os.path.isdir(d) else []


CARGO_SHIM = """#!/usr/bin/env bash
# dockerfile_replay.py --mode check: `cargo build ...` runs as `cargo check ...` (the subcommand is the
# first argument that is neither a +toolchain nor an option).
args=() seen=0
for a in "$@"; do
  if (( !seen )) && [[ "$a" != +* && "$a" != -* ]]; then
    seen=1
    [[ "$a" == build ]] && a=check
  fi
  args+=("$a")
done
exec "$REAL_CARGO" "${args[@]}"
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["check", "build"], default="check")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("--dockerignore", help="use this file instead of CONTEXT/.dockerignore")
    ap.add_argument("--cache", help="a directory for the file systems after RUN (a layer cache)")
    ap.add_argument("dockerfile")
    ap.add_argument("context")
    a = ap.parse_args()
    context = os.path.abspath(a.context)
    stages = parse_stages(open(a.dockerfile).read())
    by_name = {name: (name, base, ins) for name, base, ins in stages}
    final = stages[-1]
    wanted = [m.group(1) for instr, args in final[2] if instr == "COPY"
              for m in [re.search(r"--from=(\S+)", args)] if m]
    chain = []
    for name in dict.fromkeys(wanted):
        link = []
        while name in by_name and name not in chain and name not in link:
            link.append(name)
            name = by_name[name][1]
        chain.extend(reversed(link))
    if not chain:
        sys.exit(f"{a.dockerfile}: the final stage copies from no build stage")
    ignore = DockerIgnore(a.dockerignore or os.path.join(context, ".dockerignore"))
    if a.cache:
        # One fixed place, so the absolute paths cargo records in a cached target directory still hold.
        tmp = os.path.join(os.path.abspath(a.cache), "replay")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    else:
        tmp = tempfile.mkdtemp(prefix="dockerfile-replay-")
    root = os.path.join(tmp, "root")
    env = {k: v for k, v in os.environ.items() if k not in ("CARGO_TARGET_DIR", "CARGO_BUILD_TARGET_DIR")}
    env["CARGO_NET_OFFLINE"] = "true"
    if a.mode == "check":
        shim = os.path.join(tmp, "shim")
        os.makedirs(shim)
        with open(os.path.join(shim, "cargo"), "w") as f:
            f.write(CARGO_SHIM)
        os.chmod(os.path.join(shim, "cargo"), 0o755)
        env["REAL_CARGO"] = shutil.which("cargo") or sys.exit("no cargo on PATH")
        # Build scripts still compile C (aws-lc-sys) under `cargo check`: at -O0 without debug info,
        # which needs the same files as the release build and a fraction of its time.
        env["CARGO_PROFILE_RELEASE_OPT_LEVEL"] = "0"
        env["CARGO_PROFILE_RELEASE_DEBUG"] = "false"
        env["PATH"] = f"{shim}:{env['PATH']}"
    started, rc = time.monotonic(), 0
    workdir, workdirs = "/", set()
    digest = hashlib.sha256(f"{a.mode}\0{shutil.which('cargo')}\0".encode())
    try:
        for name in chain:
            _, base, instructions = by_name[name]
            digest.update(f"FROM {base}\0".encode())
            print(f"  stage {name} (FROM {base}), {len(instructions)} instructions, mode {a.mode}")
            stage_args = {}
            for instr, args in instructions:
                digest.update(f"{instr} {args}\0".encode())
                if instr == "WORKDIR":
                    workdir = os.path.join(workdir, args.strip())
                    workdirs.add(workdir.rstrip("/"))
                    os.makedirs(root + workdir, exist_ok=True)
                elif instr == "ENV":
                    for k, v in re.findall(r'(\w+)=("[^"]*"|\S+)', args):
                        env[k] = v.strip('"')
                elif instr == "ARG":
                    k, _, v = args.partition("=")
                    stage_args[k.strip()] = v.strip()
                elif instr == "COPY":
                    words = shlex.split(args)
                    if any(w.startswith("--from=") for w in words):
                        continue
                    words = [w for w in words if not w.startswith("--")]
                    dest = os.path.join(workdir, words[-1]).lstrip("/") + ("/" if words[-1].endswith("/") else "")
                    copy_into(context, ignore, words[:-1], dest, root, digest)
                elif instr == "RUN":
                    cmd = args
                    for wd in sorted(workdirs, key=len, reverse=True):
                        cmd = re.sub(rf"(?<![\w/.]){re.escape(wd)}(?=/|\s|$)", root + wd, cmd)
                    layer = os.path.join(a.cache, digest.hexdigest()) if a.cache and name != chain[-1] else None
                    if layer and os.path.isdir(layer):
                        print(f"  RUN {args[:80]}… (cached)", flush=True)
                        shutil.rmtree(root)
                        shutil.copytree(layer, root, symlinks=True)
                        continue
                    print(f"  RUN {args[:100]}{'…' if len(args) > 100 else ''}", flush=True)
                    r = subprocess.run(["bash", "-ec", cmd], cwd=root + workdir, env={**env, **stage_args})
                    if r.returncode:
                        print(f"dockerfile_replay: RUN failed (exit {r.returncode}) in stage {name}: {args}")
                        return 1
                    if layer:
                        shutil.copytree(root, layer + ".tmp", symlinks=True)
                        os.rename(layer + ".tmp", layer)
        if a.mode == "build":
            for instr, args in final[2]:
                if instr == "COPY" and "--from=" in args:
                    src = shlex.split(args)[-2]
                    if not os.path.exists(root + src):
                        print(f"dockerfile_replay: the final stage copies {src}, which the build did not produce")
                        rc = 1
    except FileNotFoundError as e:
        print(f"dockerfile_replay: {e}")
        return 1
    finally:
        if a.keep:
            print(f"  kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"  replayed stages {', '.join(chain)} of {a.dockerfile} ({a.mode}) in {time.monotonic() - started:.0f} s")
    return rc


if __name__ == "__main__":
    sys.exit(main())
