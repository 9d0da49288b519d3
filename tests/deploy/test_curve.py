"""The CURVE keys the Kubernetes manifests mount are laid out as --zmq-curve-dir reads them:
the gateway gets its keypair and the admitted worker key, the worker its keypair and the
gateway's public key, and the pairs match."""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq.auth
from deploy_files import pod_spec, resources

from vdiff_common import curve


def test_manifests_mount_a_working_curve_layout(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    curve.generate(keys, [curve.WORKER])
    # The Secrets as secrets.yaml says to make them from `vdiff keys generate keys/`.
    secrets = {
        "vdiff-curve-gateway": {
            "gateway.key_secret": keys / "gateway.key_secret",
            "worker.key": keys / "authorized" / "worker.key",
        },
        "vdiff-curve-worker": {
            "worker.key_secret": keys / "worker.key_secret",
            "gateway.key": keys / "gateway.key",
        },
    }
    dirs: dict[str, Path] = {}
    for _, doc in resources():
        name = doc.get("metadata", {}).get("name")
        if doc["kind"] == "Secret" and name in secrets:
            assert set(doc["stringData"]) == set(secrets[name])  # the placeholders' keys
        spec = pod_spec(doc)
        for container in (spec or {}).get("containers", []):
            given = [
                a.split("=", 1)[1]
                for a in container.get("args", [])
                if a.startswith("--zmq-curve-dir=")
            ]
            if not given:
                continue
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == given[0])
            volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])["secret"]
            root = tmp_path / name
            for item in volume["items"]:  # what the kubelet projects into the mount
                (root / item["path"]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(secrets[volume["secretName"]][item["key"]], root / item["path"])
            dirs[name] = root
    assert set(dirs) == {"vdiff-gateway", "vdiff-worker"}
    server, authorized = curve.server_keys(str(dirs["vdiff-gateway"]))
    client = curve.client_keys(str(dirs["vdiff-worker"]))
    assert client.server == server.public
    assert client.public in set(zmq.auth.load_certificates(authorized))
    assert not (dirs["vdiff-worker"] / "gateway.key_secret").exists()
