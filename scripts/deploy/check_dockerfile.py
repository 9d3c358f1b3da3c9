#!/usr/bin/env python3
"""Checks of deploy/Dockerfile that hadolint does not make (no container engine needed).

    check_dockerfile.py DOCKERFILE CARGO_TOML

  * the dependency stage stubs every workspace member and the build stage copies each one, or
    `cargo build` fails inside the image build;
  * the runtime stage works without a shell: ENTRYPOINT, CMD and HEALTHCHECK in exec form (a JSON
    array; the shell form would run /bin/sh, which distroless does not have), no SHELL instruction, RUN
    only in exec form; the ENTRYPOINT and HEALTHCHECK programs are files the stage copies in; the user
    is numeric and not root (Kubernetes' runAsNonRoot can only verify a numeric user).
Exit status 1 with every problem listed.
"""
import json
import os
import re
import sys
import tomllib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dockerfile_replay import parse_stages  # noqa: E402


def exec_form(args):
    """The argv of an exec-form instruction, or None for the shell form."""
    try:
        argv = json.loads(args)
    except json.JSONDecodeError:
        return None
    return argv if isinstance(argv, list) and argv and all(isinstance(a, str) for a in argv) else None


def check_members(text, members, problems):
    missing = [m for m in members
               if f"COPY {m}/Cargo.toml {m}/Cargo.toml" not in text
               or not re.search(rf"^COPY {re.escape(m)} {re.escape(m)}$", text, re.M)
               or not re.search(rf"for member in [^;]*\b{re.escape(m)}\b", text)]
    if missing:
        problems.append(f"workspace members missing from the build stages: {missing}")


def check_runtime(stage, problems):
    name, base, instructions = stage
    where = f"runtime stage {name} (FROM {base})"
    copied = set()
    for instr, args in instructions:
        if instr == "COPY":
            copied.add(args.split()[-1])
    seen = {}
    for instr, args in instructions:
        seen.setdefault(instr, []).append(args)
        if instr == "SHELL":
            problems.append(f"{where}: SHELL instruction (the runtime image has no shell)")
        elif instr == "RUN" and exec_form(args) is None:
            problems.append(f"{where}: RUN in shell form needs /bin/sh: use exec form [\"prog\", \"arg\"]")
        elif instr in ("ENTRYPOINT", "CMD"):
            argv = exec_form(args)
            if argv is None:
                problems.append(f"{where}: {instr} in shell form ({args}) would run /bin/sh -c: use exec form")
            elif instr == "ENTRYPOINT" and argv[0] not in copied:
                problems.append(f"{where}: ENTRYPOINT {argv[0]} is not a file this stage copies in")
        elif instr == "HEALTHCHECK":
            m = re.search(r"\bCMD\s+(.*)$", args)
            argv = exec_form(m.group(1)) if m else None
            if argv is None:
                problems.append(f"{where}: HEALTHCHECK must be CMD in exec form (shell form runs /bin/sh): {args}")
            elif argv[0] not in copied:
                problems.append(f"{where}: HEALTHCHECK program {argv[0]} is not a file this stage copies in")
    for instr in ("ENTRYPOINT", "HEALTHCHECK", "USER"):
        if instr not in seen:
            problems.append(f"{where}: no {instr}")
    for user in seen.get("USER", [])[-1:]:
        uid = user.split(":")[0]
        if not uid.isdigit() or uid == "0":
            problems.append(f"{where}: USER {user} must be a numeric non-root uid")


def main():
    dockerfile, cargo_toml = sys.argv[1:3]
    text = open(dockerfile).read()
    stages = parse_stages(text)
    members = tomllib.load(open(cargo_toml, "rb"))["workspace"]["members"]
    problems = []
    check_members(text, members, problems)
    check_runtime(stages[-1], problems)
    for p in problems:
        print(f"ERROR {dockerfile}: {p}")
    if problems:
        return 1
    print(f"  the build stages cover the workspace members {members}; the runtime stage "
          f"({stages[-1][1]}) needs no shell: exec-form ENTRYPOINT, HEALTHCHECK and RUN, numeric non-root USER")
    return 0


if __name__ == "__main__":
    sys.exit(main())
