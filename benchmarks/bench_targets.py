"""Read ``tacdiff bench --json`` files and print how far each correction gets towards its targets.

    python benchmarks/bench_targets.py BENCH.json [MORE.json ...] --samples 256 --calib-samples 128
        [--targets pixel|latent] [--markdown OUT.md]

Files from separate runs on the same seeds (e.g. one per bits setting) are read as one table; their FP rows
must agree. Per bits setting and step count, for every method: FID relative to FP, the share of the PTQ-to-FP
FID gap it closes, paired x0 PSNR gain over PTQ, prompt accuracy change against FP (text-to-image runs),
sampling time relative to PTQ (same paired run), and calibration time per trajectory relative to the quantized
model's sampling time per image (``--samples``/``--calib-samples`` say how many of each the bench drew). Then the
targets, each marked met or not met. ``pixel`` (the TAC issue, on the bundled model):

* W4A8: TAC FID within 5% of FP, closing at least 70% of the PTQ-to-FP gap, and below PTQD's;
* W3A8: TAC closes at least 50% of the gap, with x0 PSNR at least 3 dB above PTQ's;
* TAC sampling at most 2% slower than PTQ; TAC calibration no slower per sample than sampling.

``latent`` (the latent reference issue): W4A8 TAC FID within 10% of FP and prompt accuracy within 2 points of
FP's, the other W4A8 targets as above; W3A8 as above and below PTQD's FID; calibration at most 2.5x sampling.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tacdiff.io.atomic import write_text_atomically

Rows = dict[tuple[str, int, str], dict[str, Any]]


@dataclass(frozen=True)
class Targets:
    """The thresholds one issue states (fractions; dB for the PSNR gain)."""

    w4a8_fid_vs_fp: float
    w4a8_gap: float = 0.70
    w3a8_gap: float = 0.50
    w3a8_psnr_gain: float = 3.0
    w3a8_beats_ptqd: bool = False
    prompt_points: float | None = None
    overhead: float = 0.02
    calib_vs_sampling: float = 1.0


TARGETS = {"pixel": Targets(w4a8_fid_vs_fp=0.05),
           "latent": Targets(w4a8_fid_vs_fp=0.10, w3a8_beats_ptqd=True, prompt_points=0.02, calib_vs_sampling=2.5)}


def bench_rows(data: dict[str, Any] | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows of a ``tacdiff bench --json`` file: ``{"settings", "rows"}``, or a bare list (older files)."""
    return data["rows"] if isinstance(data, dict) else data


def index(rows: list[dict[str, Any]]) -> Rows:
    """Rows keyed by (bits, steps, method); FP's row is shared by every bits setting of its step count.
    ``ValueError`` when two runs' FP rows disagree (other seeds or models)."""
    keyed: Rows = {}
    for row in rows:
        key = (row["bits"], row["steps"], row["method"])
        if key in keyed and key[2] == "fp" and keyed[key]["fid"] != row["fid"]:
            raise ValueError(f"the files' FP rows differ at DDIM {key[1]} (FID {keyed[key]['fid']} vs {row['fid']}): "
                             "they are not from the same model and seeds")
        keyed.setdefault(key, row)
    return keyed


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
                          prompt_change=_change(row.get("prompt_accuracy"), fp.get("prompt_accuracy")),
                          sample_vs_ptq=row["sample_seconds"] / ptq["sample_seconds"] - 1,
                          calib_vs_sampling=per_calib / per_sample))
    return lines


def _change(value: float | None, reference: float | None) -> float | None:
    return None if value is None or reference is None else value - reference


def targets(rows: Rows, lines: list[dict[str, Any]], goal: Targets) -> list[tuple[str, bool, str]]:
    """(target, met, measured) for every target whose rows the bench files hold."""
    tac = {(line["bits"], line["steps"]): line for line in lines if line["method"] == "tac"}
    out = []
    for (bits, steps), line in tac.items():
        where = f"{bits} DDIM {steps}"
        ptqd = rows[bits, steps, "ptqd"]["fid"] if (bits, steps, "ptqd") in rows else None
        gap = (f"{line['gap_closed']:.0%} of PTQ {rows[bits, steps, 'ptq']['fid']:.2f} - FP "
               f"{rows['fp', steps, 'fp']['fid']:.2f}")  # a tiny gap makes any share large
        if bits == "w4a8":
            out.append((f"{where}: TAC FID within {goal.w4a8_fid_vs_fp:.0%} of FP",
                        line["fid_vs_fp"] <= goal.w4a8_fid_vs_fp,
                        f"{line['fid_vs_fp']:+.1%} (FID {line['fid']:.2f} vs {rows['fp', steps, 'fp']['fid']:.2f})"))
            out.append((f"{where}: TAC closes >= {goal.w4a8_gap:.0%} of the PTQ-FP gap",
                        line["gap_closed"] >= goal.w4a8_gap, gap))
            if goal.prompt_points is not None and line["prompt_change"] is not None:
                out.append((f"{where}: TAC prompt accuracy within {goal.prompt_points * 100:.0f} points of FP",
                            line["prompt_change"] >= -goal.prompt_points,
                            f"{line['prompt_change'] * 100:+.1f} points"))
        if ptqd is not None and (bits == "w4a8" or bits == "w3a8" and goal.w3a8_beats_ptqd):
            out.append((f"{where}: TAC FID below PTQD's", line["fid"] < ptqd, f"{line['fid']:.2f} vs {ptqd:.2f}"))
        if bits == "w3a8":
            out.append((f"{where}: TAC closes >= {goal.w3a8_gap:.0%} of the PTQ-FP gap",
                        line["gap_closed"] >= goal.w3a8_gap, gap))
            out.append((f"{where}: TAC x0 PSNR >= PTQ + {goal.w3a8_psnr_gain:g} dB",
                        line["psnr_gain"] >= goal.w3a8_psnr_gain, f"{line['psnr_gain']:+.2f} dB"))
        out.append((f"{where}: TAC sampling <= {goal.overhead:.0%} slower than PTQ",
                    line["sample_vs_ptq"] <= goal.overhead, f"{line['sample_vs_ptq']:+.1%}"))
        out.append((f"{where}: TAC calibration per trajectory <= {goal.calib_vs_sampling:g}x sampling per image",
                    line["calib_vs_sampling"] <= goal.calib_vs_sampling, f"{line['calib_vs_sampling']:.2f}x"))
    return out


def markdown(lines: list[dict[str, Any]], checks: list[tuple[str, bool, str]]) -> str:
    table = ["| bits | steps | method | FID | FID vs FP | gap closed | x0 PSNR gain dB | prompt acc vs FP "
             "| sampling vs PTQ | calib / sampling per sample |", "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    table += [f"| {x['bits']} | {x['steps']} | {x['method']} | {x['fid']:.2f} | {x['fid_vs_fp']:+.1%} | "
              f"{x['gap_closed']:.0%} | {x['psnr_gain']:+.2f} | "
              f"{'n/a' if x['prompt_change'] is None else format(x['prompt_change'] * 100, '+.1f')} | "
              f"{x['sample_vs_ptq']:+.1%} | {x['calib_vs_sampling']:.2f}x |"
              for x in lines]
    table += ["", "| target | met | measured |", "|---|---|---|"]
    table += [f"| {name} | {'yes' if met else 'no'} | {measured} |" for name, met, measured in checks]
    return "\n".join(table) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bench_json", nargs="+", help="files `tacdiff bench --json` wrote (same seeds)")
    parser.add_argument("--targets", choices=list(TARGETS), default="pixel", help="whose targets to check")
    parser.add_argument("--samples", type=int, required=True, help="evaluation images per method in that run")
    parser.add_argument("--calib-samples", type=int, required=True, help="calibration trajectories in that run")
    parser.add_argument("--markdown", help="also write the tables here")
    args = parser.parse_args()
    if args.samples < 1 or args.calib_samples < 1:
        parser.error("--samples and --calib-samples must be >= 1")
    try:
        rows = index([row for path in args.bench_json for row in bench_rows(json.loads(Path(path).read_text()))])
    except ValueError as error:
        parser.error(str(error))
    missing = sorted({" ".join(map(str, key)) for bits, steps, _ in rows if bits != "fp"
                      for key in (("fp", steps, "fp"), (bits, steps, "ptq")) if key not in rows})
    if missing:
        parser.error(f"the bench file lacks the rows {missing}: run tacdiff bench with --method fp and ptq too")
    lines = summary(rows, args.samples, args.calib_samples)
    text = markdown(lines, targets(rows, lines, TARGETS[args.targets]))
    print(text, end="")
    if args.markdown:
        write_text_atomically(args.markdown, text)


if __name__ == "__main__":
    main()
