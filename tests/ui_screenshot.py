"""Open an evaluate run in the MLflow UI in a real (headless) browser, check that the per-answer
comparison shows what the README says, and save screenshots of it.

    apt-get install -y chromium chromium-driver && pip install selenium==4.51.0
    python -m tests.ui_screenshot --tracking_uri sqlite:////path/to/mlflow.db

It starts `mlflow ui` on the store, opens the experiment's Evaluations page comparing the two
models' evaluation runs (`evaluate/onnx` against `evaluate/transformers`), checks that every
row's question, both answers, the expected answer and each scorer's column are on the page, and
writes docs/evaluation-ui.png; then opens one answer's trace and checks its assessments show
their rationales (docs/evaluation-trace.png). It exits non-zero, naming what is missing, if the
page does not show it. Not part of the test suite: it needs chromium, which CI does not install.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow

from phi3flow.core import names
from phi3flow.evaluation.decision import Decision
from phi3flow.evaluation.metrics import AGREEMENT, EXACT, QUALITY

ROOT = Path(__file__).resolve().parents[1]
# The chevron that shows an assessment's rationale in the MLflow 3.15 trace view.
EXPAND_ASSESSMENT = ("button[data-component-id="
                     "'shared.model-trace-explorer.toggle-assessment-expanded']")


def wait_for_ui(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise SystemExit(f"mlflow ui did not answer at {url} within {seconds:.0f} s")


def latest_evaluate_run() -> str:
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list", max_results=1,
                              filter_string=f"tags.`{names.TAG_STEP}` = '{names.EVALUATE}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    if not runs:
        raise SystemExit("no finished evaluate run in this store: run main first")
    return runs[0].info.run_id


def page_text(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.TAG_NAME, "body").text


def wait_for_text(driver, wanted: list[str], seconds: float = 60) -> list[str]:
    deadline = time.time() + seconds
    while True:
        text = page_text(driver)
        missing = [w for w in wanted if w not in text]
        if not missing or time.time() > deadline:
            return missing
        time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking_uri", default="sqlite:///mlflow.db")
    parser.add_argument("--evaluate_run_id", default="", help="default: the latest")
    parser.add_argument("--port", type=int, default=5055)
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    args = parser.parse_args()

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    mlflow.set_tracking_uri(args.tracking_uri)
    run = mlflow.get_run(args.evaluate_run_id or latest_evaluate_run())
    decision = Decision.read(run)
    table = mlflow.load_table(names.EVAL_TABLE, run_ids=[run.info.run_id])
    url = f"http://127.0.0.1:{args.port}"
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri",
                           args.tracking_uri, "--host", "127.0.0.1", "--port", str(args.port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                 "--window-size=1900,1150"):
        options.add_argument(flag)
    driver = None
    try:
        wait_for_ui(url)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        onnx, transformers = decision.eval_runs["onnx"], decision.eval_runs["transformers"]
        driver.get(f"{url}/#/experiments/{run.info.experiment_id}/evaluation-runs?"
                   f"selectedRunUuid={onnx}&compareToRunUuid={transformers}")
        missing = wait_for_text(driver, ["Comparing", "evaluate/onnx", "evaluate/transformers",
                                         "expected_response", AGREEMENT.name])
        # The rows above the fold (the UI lists newest first): each with both answers.
        text = page_text(driver)
        shown = table[[question in text for question in table["question"]]]
        if len(shown) < min(6, len(table)):
            missing.append(f"the questions (only {len(shown)} of {len(table)} shown)")
        missing += [answer for answer in [*shown["onnx_answer"], *shown["transformers_answer"],
                                          *shown["expected"]] if answer not in text]
        for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label='Close']"):
            button.click()  # the assistant side panel, which hides the scorer columns
        time.sleep(2)
        missing += wait_for_text(driver, [QUALITY.name, EXACT.name], seconds=10)
        driver.save_screenshot(str(args.out / "evaluation-ui.png"))
        # One answer of one model, opened: its trace with each assessment and its rationale.
        trace_id = shown["onnx_trace_id"].iloc[0]
        driver.get(f"{url}/#/experiments/{run.info.experiment_id}/traces?"
                   f"selectedEvaluationId={trace_id}")
        missing += wait_for_text(driver, ["Assessments", "expected_response"], seconds=30)
        for button in driver.find_elements(By.XPATH, "//button[normalize-space(.)='Got it']"):
            # one-time "new feature" tooltips, one over the assessments (some hidden: clicked
            # through the page's script, which does not care whether they are on top)
            driver.execute_script("arguments[0].click()", button)
        for button in driver.find_elements(By.CSS_SELECTOR, EXPAND_ASSESSMENT):
            button.click()
        missing += wait_for_text(driver, ["is a word of the answer", "transformers answered"],
                                 seconds=30)
        driver.save_screenshot(str(args.out / "evaluation-trace.png"))
    finally:
        if driver is not None:
            driver.quit()
        ui.terminate()
        ui.wait(timeout=30)
    if missing:
        raise SystemExit(f"the MLflow UI did not show: {missing}")
    print(f"checked the comparison of {onnx} and {transformers} in evaluate run "
          f"{run.info.run_id}; wrote {args.out}/evaluation-ui.png and evaluation-trace.png")


if __name__ == "__main__":
    main()
