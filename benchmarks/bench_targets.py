"""Read a ``tacdiff bench --json`` file and print how far each correction gets towards its targets.

    python benchmarks/bench_targets.py BENCH.json --samples 256 --calib-samples 128 [--markdown OUT.md]

Per bits setting and step count, for every method: FID relative to FP, the share of the PTQ-to-FP
FID gap it closes, paired x0 PSNR gain over PTQ, sampling time relative to PTQ (same paired run),
and calibration time per trajectory relative to the quantized model's sampling time per image
(``--samples``/``--calib-samples`` say how many of each the bench drew). Then the targets of the
TAC issue, each marked met or not met:

* W4A8: TAC FID within 5% of FP, closing at least 70% of the PTQ-to-FP gap, and below PTQD's;
* W3A8: TAC closes at least 50% of the gap, with x0 PSNR at least 3 dB above PTQ's;
* TAC sampling at most 2% slower than PTQ; TAC calibration no slower per sample than sampling.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from tacdiff.io.atomic import write_text_atomically

Rows = dict[tuple[str, int, str], dict[str, Any]]


def index(rows: list[dict[str, Any]]) -> Rows:
    """Rows keyed by (bits, steps, method); FP's row is shared by every bits setting of its step count."""
    return {(row["bits"], row["steps"], row["method"]): row for row in rows}


def gap_closed(fid: float, ptq: float, fp: float) -> float:
    """Share of the PTQ-to-FP FID gap that a method's FID closes (1 = FP's FID, 0 = PTQ's; NaN without a gap)."""
    return (ptq - fid) / (ptq - fp) if ptq != fp else float("nan")


def summary(rows: Rows, samples: int, calib_samples: int) -> list[dict[str, Any]]:
    """One line per quantized method: the ratios the targets are stated in."""
    lines = []
    for (bits, steps, method), row in rows.items():
        if method in ("fp", "ptq"):
            continue
        ptq, fp = rows[bits, steps, "ptq"], rows["fp", steps, "fp"]
        per_calib = row["calib_seconds"] / calib_samples
        per_sample = ptq["sample_seconds"] / samples
        lines.append(dict(bits=bits, steps=steps, method=method, fid=row["fid"], fid_vs_fp=row["fid"] / fp["fid"] - 1,
                          gap_closed=gap_closed(row["fid"], ptq["fid"], fp["fid"]),
                          psnr_gain=row["x0_psnr"] - ptq["x0_psnr"],
                          sample_vs_ptq=row["sample_seconds"] / ptq["sample_seconds"] - 1,
                          calib_vs_sampling=per_calib / per_sample))
    return lines


def targets(rows: Rows, lines: list[dict[str, Any]]) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for every target whose rows the bench file holds."""
    tac = {(line["bits"], line["steps"]): line for line in lines if line["method"] == "tac"}
    out = []
    for (bits, steps), line in tac.items():
        where = f"{bits} DDIM {steps}"
        if bits == "w4a8":
            out.append((f"{where}: TAC FID within 5% of FP", line["fid_vs_fp"] <= 0.05,
                        f"{line['fid_vs_fp']:+.1%} (FID {line['fid']:.2f} vs {rows['fp', steps, 'fp']['fid']:.2f})"))
            out.append((f"{where}: TAC closes >= 70% of the PTQ-FP gap", line["gap_closed"] >= 0.70,
                        f"{line['gap_closed']:.0%}"))
            if (bits, steps, "ptqd") in rows:
                ptqd = rows[bits, steps, "ptqd"]["fid"]
                out.append((f"{where}: TAC FID below PTQD's", line["fid"] < ptqd, f"{line['fid']:.2f} vs {ptqd:.2f}"))
        if bits == "w3a8":
            out.append((f"{where}: TAC closes >= 50% of the PTQ-FP gap", line["gap_closed"] >= 0.50,
                        f"{line['gap_closed']:.0%}"))
            out.append((f"{where}: TAC x0 PSNR >= PTQ + 3 dB", line["psnr_gain"] >= 3.0,
                        f"{line['psnr_gain']:+.2f} dB"))
        out.append((f"{where}: TAC sampling <= 2% slower than PTQ", line["sample_vs_ptq"] <= 0.02,
                    f"{line['sample_vs_ptq']:+.1%}"))
        out.append((f"{where}: TAC calibration per trajectory <= sampling per image", line["calib_vs_sampling"] <= 1.0,
                    f"{line['calib_vs_sampling']:.2f}x"))
    return out


def markdown(lines: list[dict[str, Any]], checks: list[tuple[str, bool, str]]) -> str:
    table = ["| bits | steps | method | FID | FID vs FP | gap closed | x0 PSNR gain dB | sampling vs PTQ "
             "| calib / sampling per sample |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {x['bits']} | {x['steps']} | {x['method']} | {x['fid']:.2f} | {x['fid_vs_fp']:+.1%} | "
              f"{x['gap_closed']:.0%} | {x['psnr_gain']:+.2f} | {x['sample_vs_ptq']:+.1%} | "
              f"{x['calib_vs_sampling']:.2f}x |"
              for x in lines]
    table += ["", "| target | met | measured |", "|---|---|---|"]
    table += [f"| {name} | {'yes' if met else 'no'} | {measured} |" for name, met, measured in checks]
    return "\n".join(table) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", help="the file `tacdiff bench --json` wrote")
    parser.add_argument("--samples", type=int, required=True, help="evaluation images per method in that run")
    parser.add_argument("--calib-samples", type=int, required=True, help="calibration trajectories in that run")
    parser.add_argument("--markdown", help="also write the tables here")
    args = parser.parse_args()
    if args.samples < 1 or args.calib_samples < 1:
        parser.error("--samples and --calib-samples must be >= 1")
    rows = index(json.loads(Path(args.bench_json).read_text()))
    missing = sorted({" ".join(map(str, key)) for bits, steps, _ in rows if bits != "fp"
                      for key in (("fp", steps, "fp"), (bits, steps, "ptq")) if key not in rows})
    if missing:
        parser.error(f"the bench file lacks the rows {missing}: run tacdiff bench with --method fp and ptq too")
    lines = summary(rows, args.samples, args.calib_samples)
    text = markdown(lines, targets(rows, lines))
    print(text, end="")
    if args.markdown:
        write_text_atomically(args.markdown, text)


if __name__ == "__main__":
    main()
