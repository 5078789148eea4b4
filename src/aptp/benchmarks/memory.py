"""Peak resident memory of an ``APTPPipeline`` generating a few prompts and many prompts.

``aptp bench memory --pipeline P``: each prompt count runs in a fresh process, which loads the
pipeline, generates the world test prompts and reports its peak resident set size; the target is
that the largest count's peak stays within +15% of the smallest's (experts denoise in chunks of
``max_batch_size``, so memory does not grow with the number of prompts).
"""

from __future__ import annotations

import multiprocessing
import resource
import sys

from ..config import DEFAULT_MAX_BATCH_SIZE

TARGET = 1.15  # peak(largest count) <= TARGET x peak(smallest count)


def _peak_rss_bytes() -> int:
    # Linux: the peak of this process image. ru_maxrss also keeps, across the exec of a spawned process, the
    # resident size of the parent's memory the fork shared, so a large parent would inflate a child's peak.
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def _measure(pipeline_dir: str, count: int, steps: int, max_batch_size: int, threads: int, queue) -> None:
    import torch
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from .. import world
    from ..pipelines import APTPPipeline

    diffusers_logging.disable_progress_bar()  # one line per count is the whole output
    transformers_logging.disable_progress_bar()
    try:
        if threads:
            torch.set_num_threads(threads)
        prompts = [s.prompt for s in world.generate(count, "test", seed=0)]
        pipeline = APTPPipeline.from_pretrained(pipeline_dir)
        pipeline.set_progress_bar_config(disable=True)
        loaded = _peak_rss_bytes()
        generators = [torch.Generator().manual_seed(i) for i in range(count)]
        images = pipeline(prompts, num_inference_steps=steps, generator=generators, output_type="np",
                          max_batch_size=max_batch_size).images
        queue.put({"count": count, "loaded_bytes": loaded, "peak_bytes": _peak_rss_bytes(),
                   "images_bytes": int(images.nbytes)})
    except Exception as error:  # reported by the parent as one line
        queue.put({"count": count, "error": f"{type(error).__name__}: {error}"})


def run_memory_benchmark(pipeline_dir: str, counts: tuple[int, ...] = (64, 1000), steps: int = 2,
                         max_batch_size: int = DEFAULT_MAX_BATCH_SIZE, threads: int = 0) -> list[dict]:
    """One row per prompt count: peak RSS after loading and after generating, each in its own process."""
    from ..utils import APTPError

    context = multiprocessing.get_context("spawn")  # a clean interpreter: nothing inherited inflates the peak
    rows = []
    for count in counts:
        queue = context.Queue()
        process = context.Process(target=_measure, args=(str(pipeline_dir), count, steps, max_batch_size, threads,
                                                          queue))
        process.start()
        process.join()
        row = queue.get() if not queue.empty() else {"error": f"the process exited with code {process.exitcode}"}
        if "error" in row:
            raise APTPError(f"memory benchmark at {count} prompts failed: {row['error']}")
        rows.append(row)
    return rows


def format_rows(rows: list[dict], steps: int, max_batch_size: int) -> str:
    base = rows[0]["peak_bytes"]
    lines = [f"aptp bench memory: world test prompts, {steps} steps, max_batch_size {max_batch_size}, "
             "one fresh process per count",
             f"  {'prompts':>8} {'RSS after loading':>18} {'peak RSS':>10} {'images':>9} {'peak ratio':>11}"]
    for row in rows:
        lines.append(f"  {row['count']:>8} {row['loaded_bytes'] / 2**20:>15.0f} MiB {row['peak_bytes'] / 2**20:>6.0f} MiB "
                     f"{row['images_bytes'] / 2**20:>5.0f} MiB {row['peak_bytes'] / base:>11.3f}")
    ratio = rows[-1]["peak_bytes"] / base
    lines.append(f"  target: peak at {rows[-1]['count']} prompts <= {TARGET} x peak at {rows[0]['count']}: "
                 f"{'met' if ratio <= TARGET else 'MISSED'} ({ratio:.3f})")
    return "\n".join(lines)
