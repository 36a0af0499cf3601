"""The `selfcog` command. Each command is a few lines that open the store and call the same
functions the web page and the Telegram bot call. Heavy imports (torch, gradio, swift) happen
inside commands, so `selfcog --help` is instant.

    selfcog serve                              # web page (+ Telegram when TELEGRAM_BOT_TOKEN is set)
    selfcog ask "who are you?" "你是谁?" --json
    selfcog identity set --name Aurora --author "Acme Labs"
    selfcog corrections import fixes.jsonl --approve
    selfcog retrain --json
"""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
import time
from pathlib import Path

import click

from bot.errors import UserError
from bot.hardware import one_malloc_arena
from bot.run_summary import duration, summarize
from selfcog.config import Settings

# Before any thread starts (a progress bar's monitor, the engine's worker, the retrain runner): every thread
# then allocates from the one heap a CPU engine keeps while it computes (bot/hardware.py, keep_freed_memory).
one_malloc_arena()


class Context:
    """What every command may need, built lazily so cheap commands stay cheap."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._store = None

    @property
    def store(self):
        if self._store is None:
            from store import Store

            self._store = Store(self.settings.db_path, busy_timeout_s=self.settings.db_timeout_s)
        return self._store

    @property
    def admin(self):
        """What the command asks for: the same calls the web admin page and Telegram make."""
        from bot.admin import Admin

        return Admin(self.store)

    def resolve_model(self):
        from bot.models import resolve_model

        return resolve_model(self.settings.model, self.settings.cache_dir)

    def engine(self, adapter: str | None = None):
        """Load the model once. adapter: None follows the active adapter; 'base' or a version pins one."""
        from bot.engines import make_engine

        if adapter is None:
            follow = self.store.adapters.active
        elif adapter == "base":
            follow = lambda: None  # noqa: E731
        elif adapter.isdigit():
            row = self.store.adapters.get(int(adapter))
            follow = lambda: row  # noqa: E731
        else:
            raise click.UsageError("--adapter takes 'base' or a version number")
        engine = make_engine(self.settings, self.resolve_model(), active_adapter=follow)
        if (command := click.get_current_context(silent=True)) is not None:
            command.call_on_close(engine.close)  # its thread stops before the interpreter does
        if engine.adapter_error:
            raise click.ClickException(engine.adapter_error)
        return engine

    def chat(self, engine=None):
        from bot.chat import ChatService

        return ChatService(self.store, engine or self.engine(), max_new_tokens=self.settings.max_new_tokens)


pass_ctx = click.make_pass_decorator(Context)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class FriendlyGroup(click.Group):
    """Every error the user can act on is one line on stderr and a non-zero exit, never a traceback:
    a UserError (bad input, missing model, nothing to train...), a locked database, a file problem."""

    def main(self, args=None, **extra):
        # Python hands bytes that are not UTF-8 over as lone surrogates (surrogateescape); saying so
        # here beats a UnicodeEncodeError deep in the store or when the answer is printed.
        for number, arg in enumerate(sys.argv[1:] if args is None else args, start=1):
            try:
                arg.encode("utf-8")
            except UnicodeEncodeError:
                raw = arg.encode("utf-8", "surrogateescape") if isinstance(arg, str) else arg
                click.echo(f"Error: argument {number} is not valid UTF-8 text ({raw!r}); "
                           "check your terminal's encoding and type it again", err=True)
                sys.exit(2)
        return super().main(args, **extra)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except UserError as e:
            raise click.ClickException(_one_line(e)) from None
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise click.ClickException(
                    f"the database is locked by another process ({e}); wait for it to finish and try again") from None
            if "unable to open" in str(e):
                raise click.ClickException(f"cannot open the database {ctx.obj.settings.db_path}: {e}") from None
            raise
        except OSError as e:
            where = f" ({e.filename})" if e.filename else ""
            raise click.ClickException(f"{e.strerror or _one_line(e)}{where}") from None


def json_option(fn):
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(fn)


def echo_json(value) -> None:
    click.echo(json.dumps(value, ensure_ascii=False, indent=2, default=str))


def echo_table(rows: list[dict], columns: list[str], widths: dict[str, int] | None = None) -> None:
    from tabulate import tabulate

    widths = widths or {}

    def cell(row, column):
        value = row.get(column)
        text = "" if value is None else str(value).replace("\n", " ")
        limit = widths.get(column, 60)
        return text if len(text) <= limit else text[: limit - 1] + "…"

    click.echo(tabulate([[cell(r, c) for c in columns] for r in rows], headers=columns) if rows else "(none)")


@click.group(cls=FriendlyGroup)
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), envvar="SELFCOG_DATA_DIR",
              help="Where the database, model cache and adapters live (default ./data).")
@click.option("--model", envvar="SELFCOG_MODEL", help="'embedded' (default), a local model folder, or a hub id.")
@click.option("-v", "--verbose", is_flag=True, help="Log more.")
@click.version_option(package_name="selfcog")
@click.pass_context
def cli(ctx, data_dir, model, verbose):
    """selfcog: a self-hosted chat bot that learns who it is from its users' corrections."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(Settings.from_env().with_overrides(data_dir=data_dir, model=model))


# --- chat ---------------------------------------------------------------------------------------

@cli.command()
@click.argument("questions", nargs=-1, required=True)
@click.option("--system", "system_text", help="Ask under this system prompt instead of the product's.")
@click.option("--no-system", is_flag=True, help="Ask with no system message (the model's own default).")
@click.option("--adapter", help="'base' for no adapter, or a version number; default: the active adapter.")
@json_option
@pass_ctx
def ask(ctx: Context, questions, system_text, no_system, adapter, as_json):
    """Answer QUESTIONS with the active adapter (one model load for all), greedily: the same every time.

        selfcog ask "who are you?" "你是谁?" --json
    """
    from bot.chat import PRODUCT_PROMPT, clean_text

    if system_text and no_system:
        raise click.UsageError("--system and --no-system cannot be used together")
    for question in questions:
        clean_text(question, what="question")  # before the model load, not after
    engine = ctx.engine(adapter)
    system = None if no_system else (system_text if system_text else PRODUCT_PROMPT)
    answers = ctx.chat(engine).answer(list(questions), system=system)
    if as_json:
        echo_json([{"question": q, "answer": a} for q, a in zip(questions, answers)])
    else:
        for question, answer in zip(questions, answers):
            click.echo(f"Q: {question}\nA: {answer}\n")


# --- identity -----------------------------------------------------------------------------------

@cli.group()
def identity():
    """Show or change who the bot is."""


@identity.command("show")
@json_option
@pass_ctx
def identity_show(ctx: Context, as_json):
    """Show the identity profile and its history.

        selfcog identity show --json
    """
    identity = ctx.admin.identity()
    if as_json:
        echo_json(identity)
    else:
        click.echo(f"name:        {identity['name']}\nauthor:      {identity['author']}\n"
                   f"description: {identity['description']}")
        click.echo(f"prompt:      {identity['system_prompt']}\nchanges:     {len(identity['history'])}")


@identity.command("set")
@click.option("--name", help="The bot's name.")
@click.option("--author", help="Who made the bot.")
@click.option("--description", help="One or two sentences added to the system prompt.")
@pass_ctx
def identity_set(ctx: Context, name, author, description):
    """Change the identity (name, author, description). Retrain to teach it to the model.

        selfcog identity set --name Aurora --author "Acme Labs"
    """
    if name is None and author is None and description is None:
        raise click.UsageError("give at least one of --name, --author, --description")
    profile = ctx.admin.set_identity(name=name, author=author, description=description, by="cli")
    click.echo(f"identity is now {profile.name} by {profile.author}; run `selfcog retrain` to teach it to the model")


# --- corrections ----------------------------------------------------------------------------------

@cli.group()
def corrections():
    """List, import, review and export corrections."""


@corrections.command("list")
@click.option("--status", type=click.Choice(["pending", "approved", "rejected", "all"]), default="all", show_default=True)
@click.option("--channel", help="Only from this channel (web, telegram, cli, import).")
@click.option("--limit", type=int, help="At most this many.")
@json_option
@pass_ctx
def corrections_list(ctx: Context, status, channel, limit, as_json):
    """List corrections.

        selfcog corrections list --status pending
    """
    rows = ctx.admin.corrections(status=None if status == "all" else status, channel=channel, limit=limit)
    if as_json:
        echo_json(rows)
    else:
        echo_table(rows, ["id", "status", "channel", "question", "wrong_answer", "corrected_answer"],
                   {"question": 40, "wrong_answer": 30, "corrected_answer": 50})


@corrections.command("import")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--approve", is_flag=True, help="Mark them approved right away (you reviewed the file).")
@json_option
@pass_ctx
def corrections_import(ctx: Context, file, approve, as_json):
    """Import question/answer pairs: selfcog JSONL, ms-swift or LLaMA-Factory self-cognition files.
    All or nothing: a bad record is named by its line and nothing is imported.

        selfcog corrections import identity.json --approve
    """
    from bot.corrections_io import read_pairs

    pairs = read_pairs(file, ctx.admin.profile())
    summary = ctx.admin.import_corrections(pairs, by="cli", approve=approve, source=file)
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"read {summary['read']} pairs: {summary['added']} added as {summary['status']}, "
                   f"{summary['duplicates']} already present")


def _review(ctx: Context, ids, status):
    done = ctx.admin.review(list(ids), status, reviewer="cli")
    click.echo(f"{status} {len(done)} correction(s): {', '.join(map(str, done))}")


@corrections.command("approve")
@click.argument("ids", nargs=-1, type=int, required=True)
@pass_ctx
def corrections_approve(ctx: Context, ids):
    """Approve corrections by id: they will be trained on.

        selfcog corrections approve 3 4 5
    """
    _review(ctx, ids, "approved")


@corrections.command("reject")
@click.argument("ids", nargs=-1, type=int, required=True)
@pass_ctx
def corrections_reject(ctx: Context, ids):
    """Reject corrections by id: they will not be trained on.

        selfcog corrections reject 6
    """
    _review(ctx, ids, "rejected")


@corrections.command("export")
@click.option("--status", type=click.Choice(["pending", "approved", "rejected", "all"]), default="approved", show_default=True)
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="Write to this file instead of stdout.")
@pass_ctx
def corrections_export(ctx: Context, status, output):
    """Export corrections as JSON Lines (question, answer, ...), which `import` reads back.

        selfcog corrections export -o approved.jsonl
    """
    from bot.corrections_io import write_pairs

    rows = ctx.admin.corrections(status=None if status == "all" else status)
    text = write_pairs(rows, output)
    if output:
        click.echo(f"wrote {len(rows)} corrections to {output}")
    else:
        click.echo(text, nl=False)


# --- retraining, evaluation, adapters -----------------------------------------------------------------

@cli.command()
@click.option("--queue", "queue_only", is_flag=True, help="Only queue it for a running `selfcog serve` to pick up.")
@click.option("--cancel", is_flag=True, help="Cancel the retrain that is queued or running.")
@click.option("--adapter", "trained", type=click.Path(path_type=Path),
              help="Skip training: evaluate this adapter folder (trained elsewhere, e.g. by `swift sft` on "
                   "several GPUs) and promote it through the same gate.")
@json_option
@pass_ctx
def retrain(ctx: Context, queue_only, cancel, trained, as_json):
    """Retrain the adapter from the approved corrections; promote it if it passes the gate.

    Where a `selfcog serve` runs on this data, its job runner carries the retrain (on the weights it
    already holds, prepared ahead) and this command follows it to the end; otherwise it runs here.

        selfcog retrain --json
        selfcog retrain --adapter runs/multi-gpu/checkpoint-42   # gate an adapter trained elsewhere
    """
    admin = ctx.admin
    if cancel:
        run = admin.cancel_retrain(by="cli")
        click.echo(f"retrain #{run['id']}: {'cancelled' if run['status'] == 'cancelled' else 'cancel requested'}")
        return
    if queue_only:
        click.echo(summarize(admin.request_retrain("cli", "cli")).outcome_line)
        return
    if trained is None and ctx.store.runs.runner_alive():
        # A second copy of the model here would double the GPU memory (a 24 GB card runs out) and
        # start cold; the server's runner has the weights, the warm trainer and the cached references.
        run = admin.request_retrain("cli", "cli")
        if not as_json:
            click.echo(f"Retrain #{run['id']}: handed to the running `selfcog serve`; following it here "
                       "(Ctrl-C stops following, not the retrain).", err=True)
        try:
            report = _follow(ctx.store, run["id"], quiet=as_json).get("report") or {}
        except KeyboardInterrupt:
            click.echo(f"Stopped following. Retrain #{run['id']} goes on in `selfcog serve`: `selfcog status` shows "
                       "it, `selfcog retrain --cancel` stops it.", err=True)
            sys.exit(130)
    else:
        from finetune.jobs import run_retrain
        from selfcog.serve import job_settings

        run = admin.request_retrain("cli", "cli", claim=True, trained=trained is not None)  # raises if one is active
        try:
            model = ctx.resolve_model()
            engine = ctx.engine()
        except BaseException as e:
            ctx.store.runs.finish(run["id"], "failed", error=str(e))
            raise
        report = run_retrain(run, store=ctx.store, engine=engine, model=model,
                             settings=job_settings(ctx.settings, engine), trained=trained)
    summary = summarize(ctx.store.runs.get(run["id"]))
    if as_json:
        echo_json({k: report.get(k) for k in ("run_id", "status", "promoted", "adapter", "metrics", "seconds",
                                              "training_split", "eval_precision", "first_look")}
                  | {"reason": report.get("reason") or "; ".join(report.get("reasons") or []) or None,
                     "outcome": summary.outcome_line, "reasons": summary.reasons, "phases": summary.phases})
    else:
        if summary.table:
            click.echo(summary.table + "\n")
        click.echo(f"{summary.outcome_line} Took {duration(summary.seconds)}.")
    if summary.status == "failed":
        sys.exit(1)


def _follow(store, run_id: int, *, quiet: bool, poll_s: float = 0.5, server_gone_s: float = 60) -> dict:
    """Wait for the run a `selfcog serve` carries to finish; say its progress (stderr) as it changes.

    If no job runner beats for ``server_gone_s`` (the server stopped), a run it left running is marked
    failed, and one still queued is left for the next server, with a message that says so."""
    said, gone_since = None, None
    while True:
        run = store.runs.get(run_id)
        if run["status"] not in ("queued", "running"):
            return run
        line = summarize(run).outcome_line
        if not quiet and line != said:
            click.echo(line, err=True)
            said = line
        if store.runs.runner_alive():
            gone_since = None
        elif gone_since is None:
            gone_since = time.monotonic()
        elif time.monotonic() - gone_since > server_gone_s:
            store.runs.reap_dead()
            if store.runs.get(run_id)["status"] == "queued":
                raise UserError(f"retrain #{run_id} is queued, but the `selfcog serve` that was to carry it "
                                "stopped: start it again, or `selfcog retrain --cancel`")
        time.sleep(poll_s)


@cli.command("eval")
@click.option("--adapter", help="A version number, 'base', or an adapter folder (default: the active adapter).")
@json_option
@pass_ctx
def eval_command(ctx: Context, adapter, as_json):
    """Score base, active and (optionally) another adapter on the held-out identity probes and general prompts.

        selfcog eval --adapter 3
    """
    from bot.engines import check_adapter_folder
    from finetune.evaluate import report_table
    from finetune.jobs import evaluate_current

    target = None
    model = ctx.resolve_model()
    if adapter and adapter != "base":
        target = ctx.store.adapters.get(int(adapter))["path"] if adapter.isdigit() else adapter
        check_adapter_folder(target, model)  # before the model load: a folder for another model is one line
    label = f"v{adapter}" if adapter and adapter.isdigit() else "adapter"
    engine = ctx.engine()
    reports = evaluate_current(ctx.store, engine, model, ctx.settings.cache_dir, target=target, label=label)
    if as_json:
        echo_json({name: report.to_dict() for name, report in reports.items()})
    else:
        click.echo(report_table(reports))
        if getattr(engine, "eval_precision", None) not in (None, getattr(engine, "precision", None)):
            click.echo(f"(matrix products in {engine.eval_precision}, as a retrain's evaluation computes them; "
                       "SELFCOG_EVAL_DTYPE=fp32 for fp32 throughout)")


@cli.group()
def adapters():
    """List, activate and roll back adapter versions."""


@adapters.command("list")
@json_option
@pass_ctx
def adapters_list(ctx: Context, as_json):
    """List adapter versions with their evaluation metrics.

        selfcog adapters list
    """
    rows = ctx.admin.adapters()
    if as_json:
        echo_json(rows)
        return
    for row in rows:
        metrics = row["metrics"] or {}
        row["live"] = "●" if row["active"] else ""
        row["identity"] = metrics.get("identity_mean")
        row["retention"] = metrics.get("retention")
    echo_table(rows, ["live", "version", "identity", "retention", "run_id", "created_at", "path"], {"path": 50})


@adapters.command("activate")
@click.argument("version")
@pass_ctx
def adapters_activate(ctx: Context, version):
    """Make VERSION live in every running front end ('base' for no adapter).

        selfcog adapters activate 2
    """
    from bot.admin import Admin

    if version != "base" and not version.isdigit():
        raise click.UsageError("VERSION is a version number or 'base'")
    model = ctx.resolve_model() if version != "base" else None  # the folder must fit this model
    Admin(ctx.store, model=model).activate(None if version == "base" else int(version), by="cli")
    click.echo(f"{'the base model' if version == 'base' else 'adapter v' + version} is now live")


@adapters.command("rollback")
@pass_ctx
def adapters_rollback(ctx: Context):
    """Go back to what was live before the last activation.

        selfcog adapters rollback
    """
    row = ctx.admin.rollback(by="cli")
    click.echo(f"rolled back: {'adapter v%d' % row['version'] if row else 'the base model'} is now live")


@cli.group()
def export():
    """Export data for other tools."""


@export.command("dataset")
@click.option("--format", "fmt", type=click.Choice(["swift", "alpaca"]), default="swift", show_default=True,
              help="ms-swift JSONL ({'messages': [...]}) or LLaMA-Factory alpaca JSON.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True, help="File to write.")
@pass_ctx
def export_dataset(ctx: Context, fmt, output):
    """Write the training set the next retrain would use.

        selfcog export dataset --format alpaca -o identity.json
    """
    from finetune.jobs import build_run_dataset, general_answers
    from finetune.train import recipe_for

    model = ctx.resolve_model()
    engine = ctx.engine(adapter="base")
    base_general = general_answers(engine, model, ctx.settings.cache_dir)
    dataset = build_run_dataset(ctx.store, base_general, recipe_for(model, engine.device), seed=0)
    (dataset.write_alpaca if fmt == "alpaca" else dataset.write_swift)(output)
    click.echo(f"wrote {len(dataset.rows)} rows ({fmt}) to {output}; sha256 {dataset.sha256[:12]}")


@cli.command()
@json_option
@pass_ctx
def status(ctx: Context, as_json):
    """Identity, live adapter, corrections waiting, and the current or last retrain.

        selfcog status
    """
    info = ctx.admin.overview()
    run = info["retrain"]
    if as_json:
        echo_json(info | {"retrain": run.to_dict() if run else None})
        return
    click.echo(f"{info['name']} by {info['author']}; live: "
               + (f"adapter v{info['adapter']}" if info["adapter"] is not None else "the base model"))
    click.echo(f"corrections: {info['pending_corrections']} pending, {info['approved_corrections']} approved")
    if run:
        click.echo(run.outcome_line)


# --- serving --------------------------------------------------------------------------------------

@cli.command()
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port for the web page (default 7860).")
@click.option("--no-telegram", is_flag=True, help="Don't start the Telegram bot even if a token is set.")
@pass_ctx
def serve(ctx: Context, host, port, no_telegram):
    """Run everything in one process: web page, Telegram bot (if TELEGRAM_BOT_TOKEN), retrain worker.

        selfcog serve --port 7860
    """
    from selfcog.serve import serve as run

    run(ctx.settings.with_overrides(host=host, port=port), store=ctx.store, web=True,
        telegram=not no_telegram, jobs=True)


@cli.command()
@click.option("--host", help="Address to listen on (default 127.0.0.1).")
@click.option("--port", type=int, help="Port (default 7860).")
@pass_ctx
def web(ctx: Context, host, port):
    """Run only the web page (chat + admin).

        selfcog web --port 7860
    """
    from selfcog.serve import serve as run

    run(ctx.settings.with_overrides(host=host, port=port), store=ctx.store, web=True, telegram=False, jobs=False)


@cli.command()
@pass_ctx
def telegram(ctx: Context):
    """Run only the Telegram bot (needs TELEGRAM_BOT_TOKEN).

        TELEGRAM_BOT_TOKEN=123:abc selfcog telegram
    """
    from selfcog.serve import serve as run

    if not ctx.settings.telegram_token:
        raise click.ClickException("TELEGRAM_BOT_TOKEN is not set: create a bot with @BotFather and export its token")
    run(ctx.settings, store=ctx.store, web=False, telegram=True, jobs=False)


def main() -> None:
    cli(prog_name="selfcog")


if __name__ == "__main__":
    main()
