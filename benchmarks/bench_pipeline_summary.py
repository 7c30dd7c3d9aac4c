"""Target 7 over several ``bench_pipeline`` runs: each run's verdict, and the pooled estimate.

One ``bench_pipeline`` run (a pipeline seed and a pix2pix seed) moves each method's Dice by
0.03-0.05 from another (benchmarks page), so a per-run verdict ("ours closes half the naive ->
oracle gap, with the CI of ours - naive above 0") is as much the run's noise as the method's.
This script reads the results JSON of several runs (default: the final code's
``bench_pipeline_final_seed0/1/2/3/4``) and reports, without training anything:

* per run (pipeline seed x pix2pix seed): every row's mean Dice, ours - naive and ours - GBA
  with the run's own 95 % paired bootstrap CI, the oracle's gain, the share of the gap closed,
  the target's four parts, and the oracle's own margin over the baseline (where the truth
  inserted does not clear baseline + 0.15, that part of the target is out of any insertion's reach);
* pooled over the runs: the mean per-case differences and the share of the gap closed,
  :math:`\\bar d_{ours-naive} / \\bar d_{oracle-naive}` (each a mean over all runs' cases), with
  a 95 % bootstrap CI that resamples the validation cases within each pipeline seed (the same
  resample for both pix2pix seeds of a pipeline seed, whose cases are the same scans), seeded.

    python benchmarks/bench_pipeline_summary.py
    python benchmarks/bench_pipeline_summary.py --runs bench_pipeline_seed2 bench_pipeline_seed1_rerun
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _common import RESULTS, machine, table, write_results  # noqa: E402
from bench_pipeline import BASELINE_MARGIN_TARGET, GAP_FRACTION_TARGET  # noqa: E402

DEFAULT_RUNS = ("bench_pipeline_final_seed0", "bench_pipeline_final_seed1", "bench_pipeline_final_seed2",
                "bench_pipeline_final_seed3", "bench_pipeline_final_seed4")
RESAMPLES = 10000
METHODS = ("baseline", "naive", "ours", "oracle", "gba")
#: The pooled differences: name -> (a, b) for a - b.
PAIRS = {"ours - naive": ("ours", "naive"), "oracle - naive": ("oracle", "naive"),
         "ours - gba": ("ours", "gba"), "ours - baseline": ("ours", "baseline"),
         "oracle - baseline": ("oracle", "baseline")}


def load_runs(names, folder: Path) -> list[dict]:
    """Every (pipeline seed, pix2pix seed) run of the named results: per-case Dice per method."""
    runs = []
    for name in names:
        path = folder / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"{path} not found: run benchmarks/bench_pipeline.py --name {name} first, "
                             "or pass --runs with the results you have.")
        data = json.loads(path.read_text())
        if data.get("quick"):
            raise SystemExit(f"{path} is a --quick run (plumbing only): leave it out.")
        for pix2pix_seed, run in data["by_pix2pix_seed"].items():
            dice = {m: np.asarray(run["per_case"][m]["dice"], float) for m in METHODS if m in run["per_case"]}
            missing = {"naive", "ours", "oracle", "baseline"} - set(dice)
            if missing:
                raise SystemExit(f"{path}, pix2pix seed {pix2pix_seed}, has no {sorted(missing)} row: "
                                 "target 7 needs rows ours, naive, oracle and the baseline.")
            runs.append({"source": name, "pipeline_seed": int(data["seed"]), "pix2pix_seed": int(pix2pix_seed),
                         "dice": dice, "paired": run["paired"], "targets": run["targets"]})
    return runs


def run_row(run: dict) -> dict:
    dice, paired = run["dice"], run["paired"]
    mean = {m: float(v.mean()) for m, v in dice.items()}
    gap = mean["oracle"] - mean["naive"]
    ci = paired["ours-naive"]["dice"]
    row = {"pipeline seed": run["pipeline_seed"], "pix2pix seed": run["pix2pix_seed"],
           **{m: mean.get(m, "–") for m in METHODS},
           "ours - naive [95 % CI]": f"{ci['mean']:+.3f} [{ci['low']:+.3f}, {ci['high']:+.3f}]",
           "oracle - naive": gap,
           "gap closed": (mean["ours"] - mean["naive"]) / gap if gap > 0 else float("nan")}
    if "ours-gba" in paired:
        g = paired["ours-gba"]["dice"]
        row["ours - gba [95 % CI]"] = f"{g['mean']:+.3f} [{g['low']:+.3f}, {g['high']:+.3f}]"
    row["ours - baseline"] = mean["ours"] - mean["baseline"]
    # The ceiling of the baseline part: where even the simulator's truth, inserted, stays below
    # baseline + margin, no insertion can meet it in that run.
    row["oracle - baseline"] = mean["oracle"] - mean["baseline"]
    row["target 7 parts met"] = f"{sum(t['pass'] for t in run['targets'].values())}/{len(run['targets'])}"
    row["target 7"] = "met" if all(t["pass"] for t in run["targets"].values()) else "not met"
    return row


def pooled(runs: list[dict], seed: int = 0) -> dict:
    """Pooled means and the gap share, with a bootstrap over cases stratified by pipeline seed."""
    def statistics(pick):
        d = {pair: np.concatenate([np.zeros(0)] + [r["dice"][a][pick[r["pipeline_seed"]]]
                                                   - r["dice"][b][pick[r["pipeline_seed"]]]
                                                   for r in runs if a in r["dice"] and b in r["dice"]])
             for pair, (a, b) in PAIRS.items()}
        values = {pair: float(v.mean()) if v.size else float("nan") for pair, v in d.items()}
        gap = values["oracle - naive"]
        values["gap closed"] = values["ours - naive"] / gap if gap > 0 else float("nan")
        return values

    sizes = {}
    for r in runs:
        n = len(r["dice"]["ours"])
        if sizes.setdefault(r["pipeline_seed"], n) != n:
            raise SystemExit(f"Pipeline seed {r['pipeline_seed']} has runs with different case counts.")
    identity = {s: np.arange(n) for s, n in sizes.items()}
    point = statistics(identity)
    counts = {pair: sum(a in r["dice"] and b in r["dice"] for r in runs) for pair, (a, b) in PAIRS.items()}
    counts["gap closed"] = counts["ours - naive"]
    rng = np.random.default_rng(seed)
    draws = {k: [] for k in point}
    for _ in range(RESAMPLES):
        sample = statistics({s: rng.integers(0, n, n) for s, n in sizes.items()})
        for k, v in sample.items():
            draws[k].append(v)
    out = {}
    for k, v in point.items():
        finite = np.asarray(draws[k], float)
        finite = finite[np.isfinite(finite)]
        low, high = (np.quantile(finite, [0.025, 0.975]) if finite.size else (np.nan, np.nan))
        out[k] = {"mean": v, "low": float(low), "high": float(high), "runs": counts[k]}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=list(DEFAULT_RUNS),
                        help="bench_pipeline results names (without extension) in --results")
    parser.add_argument("--results", default=str(RESULTS), help="folder of the results (default benchmarks/results)")
    parser.add_argument("--name", default="bench_pipeline_summary", help="results file name (without extension)")
    args = parser.parse_args(argv)

    runs = load_runs(args.runs, Path(args.results))
    rows = [run_row(r) for r in runs]
    summary = pooled(runs)
    met = sum(row["target 7"] == "met" for row in rows)
    oracle_clears = sum(row["oracle - baseline"] >= BASELINE_MARGIN_TARGET for row in rows)
    pooled_rows = [{"pooled over": f"{v['runs']} runs", "difference": k,
                    "mean [95 % CI]": f"{v['mean']:+.3f} [{v['low']:+.3f}, {v['high']:+.3f}]"}
                   for k, v in summary.items() if v["runs"]]
    info = machine()
    text = "\n".join([
        f"Summary of {', '.join(args.runs)} (written {info['date']}; nothing trained here).",
        f"Target 7 per run: ours closes >= {GAP_FRACTION_TARGET:g} of the naive -> oracle gap, the CI of "
        f"ours - naive above 0, ours > GBA-style, ours >= baseline + {BASELINE_MARGIN_TARGET:g}. "
        f"Met in {met} of {len(rows)} runs. The oracle insertion itself is at >= baseline + "
        f"{BASELINE_MARGIN_TARGET:g} in {oracle_clears} of {len(rows)} runs (column 'oracle - baseline').",
        "",
        table(rows, list(rows[0])),
        "",
        "Pooled over the runs (mean of the per-case differences over all runs' cases; 95 % bootstrap CI "
        "over the validation cases, resampled within each pipeline seed; 'gap closed' is the ratio of the "
        "pooled means):",
        "",
        table(pooled_rows, list(pooled_rows[0])),
        "",
    ])
    print(text)
    write_results(args.name, {"runs": args.runs, "per_run": rows, "pooled": summary, "runs_meeting_target_7": met,
                              "runs_oracle_clears_baseline_margin": oracle_clears,
                              "resamples": RESAMPLES}, text, folder=Path(args.results))


if __name__ == "__main__":
    main()
