"""What crossing a network costs asyncpp's pipeline: workload W at P=2 on the ray backend
with both stages on one host, then with one stage on each of two hosts, in one run.

The two hosts are network namespaces of this machine joined by a veth pair, a Ray head
in the first and a worker in the second (asyncpp.testing.two_hosts); needs root. Both rows
use the same cluster and driver (in the first host), two CPUs per node: for the second, the
driver first holds one CPU of each node, so the placement has to put one stage on each. Rows alternate
over `--repeats` rounds; each row's figures are from its median round.

    sudo .venv/bin/python benchmarks/multihost.py [--repeats 1] [--num-requests 32]

Columns: output tokens/s; the stage link each row used; the stage-to-stage time of the
hop (how long stage 1 still waited for stage 0's tensors once both were at the link;
median and p99 over every microbatch); the bytes one token moves over the hop (hidden
size x dtype bytes x 2: Llama sends the hidden states and the residual); and the bytes
host A actually sent per token crossing the hop (prompt and output tokens; TCP/IP,
gloo's framing and Ray's control traffic included).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from asyncpp.bench import make_workload_model  # noqa: E402
from asyncpp.testing.two_hosts import RayCluster, ray_on_two_hosts, unavailable_reason  # noqa: E402

CHILD = Path(__file__).resolve().with_name("multihost_child.py")
ROWS = {"one host (shm ring)": False, "two hosts (gloo over veth)": True}


def run_row(cluster: RayCluster, model: Path, split: bool, ns: argparse.Namespace) -> dict:
    cmd = cluster.head.cmd(sys.executable, str(CHILD), "--ray-address", cluster.address, "--model", str(model),
                           "--interface", cluster.head.interface, "--num-requests", str(ns.num_requests),
                           "--output-len", str(ns.output_len), *(["--split"] if split else []))
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"row failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def quantile_ms(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return 1e3 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def format_rows(rows: dict[str, dict], runs: dict[str, list[dict]]) -> str:
    lines = ["| placement | link | stage hosts | out tok/s (median; runs) | ITL p50 ms | hop median ms | hop p99 ms | "
             "hops | B/token/hop | wire B/token (A->B) |", "|" + " --- |" * 10]
    for name, r in rows.items():
        hop, stage1 = r["hop_s"], r["placement"][1]
        hosts = " / ".join(p["node"]["ip"] for p in r["placement"])
        every = ", ".join(f"{run['tok_s']:.1f}" for run in runs[name])
        lines.append(f"| {name} | {stage1['link_in']} | {hosts} | {r['tok_s']:.1f} ({every}) | "
                     f"{r['itl_p50_ms']:.1f} | {1e3 * statistics.median(hop):.3f} | {quantile_ms(hop, 0.99):.3f} | "
                     f"{len(hop)} | {r['hidden_size'] * r['elem_bytes'] * 2} | {r['wire_bytes_per_token']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=128)
    ns = parser.parse_args()
    if reason := unavailable_reason():
        print(f"multihost benchmark: {reason}", file=sys.stderr)
        return 2
    model = make_workload_model()
    runs: dict[str, list[dict]] = {name: [] for name in ROWS}
    with ray_on_two_hosts(cpus=2) as cluster:
        for _ in range(ns.repeats):
            for name, split in ROWS.items():
                runs[name].append(run_row(cluster, model, split, ns))
    rows = {name: sorted(rs, key=lambda r: r["tok_s"])[(len(rs) - 1) // 2] for name, rs in runs.items()}
    same = len({json.dumps(r["token_ids"]) for r in rows.values()}) == 1
    print(format_rows(rows, runs))
    print(f"\ngreedy token ids identical across rows: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
