"""LAPD cost computation at 900 queries: the full [B, Qt, Qs] matrix vs per-block costs (CPU time,
one torch thread; overhead-benchmark models and batch). Ad-hoc measurement, run while a training
run shared the machine (process CPU time, so less sensitive to it than wall time):

    OMP_NUM_THREADS=1 nice -n 19 python benchmarks/lapd_cost.py

Output of the two runs behind the figures in detrkd/distill/lapd.py and the README:
benchmarks/results/overhead/lapd_cost.txt. In those runs ``lapd._block_costs`` was a
first version that costed all blocks in one padded [blocks, Tmax, Smax] call (the "block costs"
line); the final per-block version is what ``per_block`` times (and what ``lapd._block_costs``
now is, so a new run prints it twice).
"""
import time, torch, numpy as np
from pathlib import Path
from detrkd.bench import Pair, fixed_batch
from detrkd.distill import lapd  # the subject measured: its private block helpers too
from detrkd.distill.pairing import prediction_cost
from detrkd.distill.query_selection import group_query_selection


def main() -> None:
    torch.set_num_threads(1)
    s, t = Pair().build(900)
    t.eval(); s.eval()
    batch = fixed_batch(8, 256, Path("data/digits"), 10)
    with torch.no_grad():
        to = t(batch["pixel_values"], batch["pixel_mask"]); so = s(batch["pixel_values"], batch["pixel_mask"])
    tl, tb = to.predictions.layer(-1); sl, sb = so.predictions.layer(-1)
    targets = batch["labels"]
    ts = group_query_selection(tl, tb, targets, to.class_head, threshold=0.0)
    ss = group_query_selection(sl, sb, targets, so.class_head, threshold=0.0)
    print("hard negatives per image t/s", ts.hard_negative.sum(1).tolist(), ss.hard_negative.sum(1).tolist())
    heads = (so.class_head, to.class_head)
    def cpu(f, n=3):
        f(); best = 1e9
        for _ in range(n):
            c0 = time.process_time(); f(); best = min(best, time.process_time() - c0)
        return best * 1e3
    full = cpu(lambda: prediction_cost(sl, sb, tl, tb, heads).cpu().numpy())
    whole = cpu(lambda: lapd.local_alignment(ss, ts, sl, sb, tl, tb, heads))
    blocks = list(lapd._hard_blocks(lapd._to_cpu(ts), lapd._to_cpu(ss), False))
    bc = cpu(lambda: lapd._block_costs(blocks, sl, sb, tl, tb, heads, (1., 5., 2.)))
    print(f"CPU ms (1 thread): full [8,900,900] cost {full:.1f}; block costs {bc:.1f} ({len(blocks)} blocks); local_alignment now {whole:.1f}")
    sizes = [(len(t), len(s)) for _, t, s in blocks]
    print("sum t*s", sum(a*b for a,b in sizes), "padded", len(blocks)*max(a for a,_ in sizes)*max(b for _,b in sizes), "full", 8*900*900)
    def per_block():
        return [prediction_cost(sl[b, torch.from_numpy(s)][None], sb[b, torch.from_numpy(s)][None], tl[b, torch.from_numpy(t)][None], tb[b, torch.from_numpy(t)][None], heads).cpu().numpy()[0] for b, t, s in blocks]
    print(f"per-block calls {cpu(per_block):.1f}")
    def per_block_out():
        out = []
        for b, t, s in blocks:
            o = torch.empty(1, len(t), len(s))
            prediction_cost(sl[b, torch.from_numpy(s)][None], sb[b, torch.from_numpy(s)][None], tl[b, torch.from_numpy(t)][None], tb[b, torch.from_numpy(t)][None], heads, out=o)
            out.append(o.numpy()[0])
        return out
    print(f"per-block calls out= {cpu(per_block_out):.1f}")
    a, b_ = per_block(), per_block_out()
    print("out= identical:", all(np.array_equal(x, y) for x, y in zip(a, b_)), max(float(np.abs(x-y).max()) for x, y in zip(a, b_)))


if __name__ == "__main__":
    main()
