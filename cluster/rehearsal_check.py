"""Helpers of cluster/rehearsal.sh: wait for the local multi-node cluster, then check role placement.

    python cluster/rehearsal_check.py wait --address 127.0.0.1:6480 --nodes 4
    python cluster/rehearsal_check.py placement --address 127.0.0.1:6480 \
        --dashboard http://127.0.0.1:8280 --submission-id spo-rehearsal-... --out placement.json \
        --expect sampler=2 --expect scorer=1 --expect trainer=1

``placement`` asks the cluster's state API which node ran every actor of the job, maps node ids to
the role nodes by the custom resource each advertises (spo_sampler / spo_scorer / spo_trainer) and
fails unless every sampler, scorer and trainer worker ran on its own role's node. Run it before the
cluster stops (the state API lists finished actors, with their node ids, while the cluster lives).
Ray Data names its actor-pool actors after the class it wraps (``MapWorker(MapBatches(SamplerWorker))``),
Ray Train its workers ``RayTrainWorker``; both the class name and the repr name are matched.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

ROLE_RESOURCES = {"sampler": "spo_sampler", "scorer": "spo_scorer", "trainer": "spo_trainer"}
ROLE_MARKERS = {"sampler": "SamplerWorker", "scorer": "ScorerWorker", "trainer": "RayTrainWorker"}


def _field(record: Any, name: str) -> Any:
    if isinstance(record, dict):
        return record.get(name)
    return getattr(record, name, None)


def role_of(actor: Any) -> str | None:
    """The SPO role an actor plays, from its class name or repr name (None: not a role actor)."""
    text = " ".join(str(_field(actor, key) or "") for key in ("class_name", "repr_name", "name"))
    for role, marker in ROLE_MARKERS.items():
        if marker in text:
            return role
    return None


def alive_nodes(address: str) -> list[Any]:
    from ray.util.state import list_nodes

    return [n for n in list_nodes(address=address, detail=True, raise_on_missing_output=False)
            if _field(n, "state") == "ALIVE"]


def node_roles(nodes: list[Any]) -> dict[str, list[str]]:
    """node id -> the roles whose custom resource the node advertises ([] for the head)."""
    out: dict[str, list[str]] = {}
    for node in nodes:
        resources = _field(node, "resources_total") or {}
        out[_field(node, "node_id")] = [role for role, res in ROLE_RESOURCES.items() if resources.get(res, 0) > 0]
    return out


def cmd_wait(args: argparse.Namespace) -> int:
    deadline = time.time() + args.timeout
    while True:
        try:
            alive = alive_nodes(args.address)
        except Exception as err:  # noqa: BLE001 - the state API comes up with the dashboard
            alive, last_error = [], err
        else:
            last_error = None
        if len(alive) >= args.nodes:
            for n in alive:
                res = _field(n, "resources_total") or {}
                custom = {k: v for k, v in res.items() if k.startswith("spo_")}
                print(f"node {_field(n, 'node_id')[:12]} CPU={res.get('CPU', 0):g} {custom or '(head: no work)'}")
            return 0
        if time.time() > deadline:
            print(f"only {len(alive)} of {args.nodes} nodes alive after {args.timeout:g}s ({last_error})", file=sys.stderr)
            return 1
        time.sleep(0.5)


def cmd_placement(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(args.dashboard).get_job_info(args.submission_id).driver_info.id
    roles_by_node = node_roles(alive_nodes(args.address))
    actors = list_actors(
        address=args.address, filters=[("job_id", "=", job_id)], detail=True, limit=10_000,
        raise_on_missing_output=False,
    )
    placed: list[dict[str, Any]] = []
    for actor in actors:
        node_id = _field(actor, "node_id")
        placed.append({
            "role": role_of(actor),
            "class_name": _field(actor, "class_name"),
            "repr_name": _field(actor, "repr_name"),
            "state": _field(actor, "state"),
            "node_id": node_id,
            "node_roles": roles_by_node.get(node_id, []),
        })
    expected = dict(item.split("=", 1) for item in args.expect)
    problems = []
    for role in ROLE_RESOURCES:
        mine = [a for a in placed if a["role"] == role]
        if len(mine) < int(expected.get(role, 1)):
            problems.append(f"{len(mine)} {role} actors found, expected at least {expected.get(role, 1)}")
        for a in mine:
            if a["node_roles"] != [role]:
                problems.append(f"{role} actor {a['repr_name'] or a['class_name']} ran on node "
                                f"{str(a['node_id'])[:12]} (roles {a['node_roles'] or 'head'})")
    report = {"job_id": job_id, "nodes": roles_by_node, "actors": placed, "problems": problems}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    for a in sorted(placed, key=lambda a: (a["role"] or "~", str(a["repr_name"]))):
        where = ",".join(a["node_roles"]) or "head"
        print(f"{a['role'] or '-':8} {str(a['repr_name'] or a['class_name'])[:60]:60} node {str(a['node_id'])[:12]} ({where})")
    for problem in problems:
        print(f"PLACEMENT PROBLEM: {problem}", file=sys.stderr)
    if not problems:
        print("placement OK: every sampler, scorer and trainer worker ran on its own role's node")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    wait = sub.add_parser("wait", help="wait until N nodes are alive")
    wait.add_argument("--address", required=True, help="GCS address, e.g. 127.0.0.1:6480")
    wait.add_argument("--nodes", type=int, required=True)
    wait.add_argument("--timeout", type=float, default=60.0)
    placement = sub.add_parser("placement", help="check that each role ran on its node")
    placement.add_argument("--address", required=True, help="GCS address, e.g. 127.0.0.1:6480")
    placement.add_argument("--dashboard", required=True, help="job API, e.g. http://127.0.0.1:8280")
    placement.add_argument("--submission-id", required=True)
    placement.add_argument("--expect", action="append", default=[], metavar="ROLE=N",
                           help="at least N actors of ROLE (default 1 each)")
    placement.add_argument("--out", default=None, help="write the report as JSON")
    args = parser.parse_args(argv)
    return cmd_wait(args) if args.command == "wait" else cmd_placement(args)


if __name__ == "__main__":
    sys.exit(main())
