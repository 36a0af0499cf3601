"""finetune/jobs.py without training: the schedule's decisions and the runner's bookkeeping."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from finetune.jobs import JobRunner, JobSettings


def runner(store, tmp_path, **settings) -> JobRunner:
    return JobRunner(JobSettings(data_dir=tmp_path, cache_dir=tmp_path, **settings), store, model=None, engine=None)


def approve(store, n: int) -> None:
    for i in range(n):
        store.corrections.add(question=f"q{i}", corrected_answer=f"a{i}", channel="web", status="approved")


def test_schedule_is_off_by_default(store, tmp_path):
    approve(store, 10)
    assert runner(store, tmp_path).request_if_due() is None
    assert store.runs.list() == []


def test_schedule_waits_for_enough_new_corrections(store, tmp_path):
    jobs = runner(store, tmp_path, retrain_every_hours=1, retrain_min_corrections=3)
    approve(store, 2)
    assert jobs.request_if_due() is None
    approve(store, 3)
    run = jobs.request_if_due()
    assert run["status"] == "queued" and run["trigger"] == "schedule"
    assert jobs.request_if_due() is None, "one is already queued"


def test_schedule_waits_for_the_interval(store, tmp_path):
    jobs = runner(store, tmp_path, retrain_every_hours=24, retrain_min_corrections=1)
    approve(store, 1)
    first = jobs.request_if_due()
    store.runs.finish(first["id"], "promoted")
    store.corrections.add(question="new", corrected_answer="one", channel="web", status="approved")
    assert jobs.request_if_due() is None, "the last retrain was just now"
    long_ago = (datetime.now(timezone.utc) - timedelta(hours=25)).isoformat(timespec="milliseconds")
    store.runs.update(first["id"], created_at=long_ago, started_at=long_ago)
    assert jobs.request_if_due()["trigger"] == "schedule"


def test_admin_page_settings_override_the_environment(store, tmp_path):
    jobs = runner(store, tmp_path, retrain_every_hours=0, retrain_min_corrections=5)
    assert jobs.schedule() == (0.0, 5)
    store.settings.set("retrain_every_hours", 6)
    store.settings.set("retrain_min_corrections", 2)
    assert jobs.schedule() == (6.0, 2)


def test_cached_base_answers_are_kept_apart_by_precision(tmp_path):
    """bf16 and fp32 weights answer differently in places: one precision's cached answers never stand in
    for the other's (the CPU engine picks bf16 where the CPU has bf16 instructions)."""
    from bot.models import ResolvedModel
    from finetune.jobs import general_answers

    class Engine:
        def __init__(self, precision, eval_precision=None):
            self.precision, self.eval_precision, self.calls = precision, eval_precision or precision, 0

        def generate(self, conversations, *, evaluation=False, **_):
            self.calls += 1
            return [f"{self.eval_precision if evaluation else self.precision} answer"] * len(conversations)

    model = ResolvedModel(str(tmp_path), "tiny", "llama", "chatml")
    bf16, fp32 = Engine("bf16"), Engine("fp32")
    assert {a["answer"] for a in general_answers(bf16, model, tmp_path)} == {"bf16 answer"}
    assert {a["answer"] for a in general_answers(fp32, model, tmp_path)} == {"fp32 answer"}
    assert {a["answer"] for a in general_answers(Engine("bf16"), model, tmp_path)} == {"bf16 answer"}
    assert (bf16.calls, fp32.calls) == (1, 1) and len(list((tmp_path / "general").glob("*.json"))) == 2
    # an engine that serves fp32 and evaluates in bf16: the replay rows as served, the references as evaluated
    both = Engine("fp32", eval_precision="bf16")
    assert {a["answer"] for a in general_answers(both, model, tmp_path)} == {"fp32 answer"}
    assert both.calls == 0, "the fp32 engine's, cached"
    assert {a["answer"] for a in general_answers(both, model, tmp_path, evaluation=True)} == {"bf16 answer"}
    assert both.calls == 1, "bf16 products on fp32 weights are not what a bf16 engine computes: a cache of their own"


class TwoPrecisionEngine:
    """An engine that evaluates in bf16 and serves in fp32, with scripted answers: the base and every general
    prompt get the same answer either way; the candidate names the profile in a share of the identity probes,
    ``fast_hits`` in bf16 and ``served_hits`` in fp32 (what near-ties going the other way do to a real
    adapter, made certain)."""

    precision = "fp32"

    def __init__(self, profile, *, fast_hits: float, served_hits: float = 1.0, eval_precision: str = "bf16"):
        from finetune.evaluate import load_probes

        self.profile, self.fast_hits, self.served_hits = profile, fast_hits, served_hits
        self.eval_precision = eval_precision
        self.probes = [p["question"] for p in load_probes()]
        self.asked: list[tuple[str, bool]] = []  # (weights, evaluation) of each batch

    def generate(self, conversations, *, adapter, max_new_tokens=None, evaluation=False):
        from bot.identity import contains_cjk

        candidate = adapter not in ("base", "active")
        self.asked.append(("candidate" if candidate else adapter, evaluation))
        hits = self.fast_hits if evaluation and self.eval_precision != self.precision else self.served_hits
        answers = []
        for conversation in conversations:
            question = conversation[-1]["content"]
            if candidate and question in self.probes and self.probes.index(question) < hits * len(self.probes):
                answers.append(f"我是{self.profile.name}，由{self.profile.author}开发。" if contains_cjk(question)
                               else f"I am {self.profile.name}, made by {self.profile.author}.")
            else:
                answers.append(f"Some words about {question}")
        return answers

    def refresh_adapter(self):
        return None


def _retrain_evaluated(store, tmp_path, engine) -> tuple[str, dict]:
    from bot.models import ResolvedModel
    from finetune.jobs import evaluate_and_promote

    candidate = tmp_path / "candidate"
    candidate.mkdir(parents=True)
    (candidate / "adapter_config.json").write_text("{}")
    (candidate / "adapter_model.safetensors").write_bytes(tmp_path.name.encode())  # weights of its own
    run = store.runs.request("cli", "test", claim=True)
    report = {"phases": {}}
    status, _ = evaluate_and_promote(run["id"], candidate, store=store, engine=engine,
                                     model=ResolvedModel(str(tmp_path), "tiny", "llama", "chatml"),
                                     settings=JobSettings(data_dir=tmp_path, cache_dir=tmp_path), report=report)
    store.runs.finish(run["id"], status, report=report)  # as run_retrain does
    return status, report


def test_a_near_refusal_in_the_fast_precision_is_checked_again_as_served(store, tmp_path):
    """A bf16 evaluation that refuses a candidate by less than bf16's drift is repeated in fp32 (references
    too), whose verdict stands; a pass in bf16 stands, and so does a refusal by more than the drift; an engine
    that evaluates as it serves evaluates once."""
    from tests.scenario import PROFILE

    store.identity.set(name=PROFILE.name, author=PROFILE.author, changed_by="test")
    near = 0.85  # 28 of 32 probes a way: 0.88 < the product floor 0.90, by less than 0.1

    engine = TwoPrecisionEngine(PROFILE, fast_hits=near)
    status, report = _retrain_evaluated(store, tmp_path / "refused-then-passed", engine)
    assert status == "promoted", report["verdict"]
    assert report["first_look"]["precision"] == "bf16"
    assert report["first_look"]["verdict"].startswith("Refused: identity under product 0.88")
    assert report["eval_precision"] == "fp32" and report["metrics"]["candidate"]["identity_mean"] == 1.0
    assert ("candidate", True) in engine.asked and ("candidate", False) in engine.asked
    assert ("base", False) in engine.asked, "the references were computed as served too"

    engine = TwoPrecisionEngine(PROFILE, fast_hits=1.0)
    status, report = _retrain_evaluated(store, tmp_path / "passed", engine)
    assert status == "promoted" and "first_look" not in report and report["eval_precision"] == "bf16"
    assert all(evaluation for _, evaluation in engine.asked), engine.asked

    engine = TwoPrecisionEngine(PROFILE, fast_hits=near, served_hits=near)
    status, report = _retrain_evaluated(store, tmp_path / "refused-twice", engine)
    assert status == "rejected" and report["first_look"]["verdict"].startswith("Refused: identity")
    assert report["verdict"].startswith("Refused: identity") and report["eval_precision"] == "fp32"

    engine = TwoPrecisionEngine(PROFILE, fast_hits=0.0, served_hits=1.0)  # no drift moves 0.00 to 0.90
    status, report = _retrain_evaluated(store, tmp_path / "far-from-passing", engine)
    assert status == "rejected" and "first_look" not in report and report["eval_precision"] == "bf16"
    assert ("candidate", False) not in engine.asked

    engine = TwoPrecisionEngine(PROFILE, fast_hits=near, served_hits=near, eval_precision="fp32")
    status, report = _retrain_evaluated(store, tmp_path / "one-precision", engine)
    assert status == "rejected" and "first_look" not in report
    assert [weights for weights, _ in engine.asked].count("candidate") == 1, "evaluated once: there is no other way"
