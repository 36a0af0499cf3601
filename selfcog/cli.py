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
from pathlib import Path

import click

from selfcog.config import Settings


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

    def resolve_model(self):
        from bot.models import resolve_model

        return resolve_model(self.settings.model, self.settings.cache_dir)

    def engine(self, adapter: str | None = None):
        """Load the model once. adapter: None follows the active adapter; 'base' or a version pins one."""
        from bot.engine import LocalEngine

        if adapter is None:
            follow = self.store.adapters.active
        elif adapter == "base":
            follow = lambda: None  # noqa: E731
        elif adapter.isdigit():
            row = self.store.adapters.get(int(adapter))
            follow = lambda: row  # noqa: E731
        else:
            raise click.UsageError("--adapter takes 'base' or a version number")
        engine = LocalEngine(self.resolve_model(), device=self.settings.device,
                             max_new_tokens=self.settings.max_new_tokens, active_adapter=follow)
        if engine.adapter_error:
            raise click.ClickException(engine.adapter_error)
        return engine

    def chat(self, engine=None):
        from bot.chat import ChatService

        return ChatService(self.store, engine or self.engine(), max_new_tokens=self.settings.max_new_tokens)


pass_ctx = click.make_pass_decorator(Context)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that are the user's to fix: shown as one line, never as a traceback."""
    from bot.chat import ChatInputError
    from bot.corrections_io import PairsFileError
    from bot.models import ModelNotFound
    from store import StoreError

    errors: list[type[BaseException]] = [ChatInputError, PairsFileError, ModelNotFound, StoreError]
    if "finetune.dataset" in sys.modules:  # only loaded by the commands that train
        from finetune.dataset import DatasetError

        errors.append(DatasetError)
    return tuple(errors)


class FriendlyGroup(click.Group):
    """Turns expected errors (bad input, locked database, missing model) into one clear line."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise click.ClickException(
                    f"the database is locked by another process ({e}); wait for it to finish and try again") from None
            raise
        except click.exceptions.Exit:
            raise
        except Exception as e:
            if isinstance(e, expected_errors()):
                raise click.ClickException(str(e)) from None
            raise


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
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 answers greedily (same every time).")
@click.option("--system", "system_text", help="Ask under this system prompt instead of the product's.")
@click.option("--no-system", is_flag=True, help="Ask with no system message (the model's own default).")
@click.option("--adapter", help="'base' for no adapter, or a version number; default: the active adapter.")
@json_option
@pass_ctx
def ask(ctx: Context, questions, temperature, system_text, no_system, adapter, as_json):
    """Answer QUESTIONS with the active adapter (one model load for all).

        selfcog ask "who are you?" "你是谁?" --json
    """
    from bot.chat import PRODUCT_PROMPT, clean_text

    if system_text and no_system:
        raise click.UsageError("--system and --no-system cannot be used together")
    for question in questions:
        clean_text(question, what="question")  # before the model load, not after
    engine = ctx.engine(adapter)
    system = None if no_system else (system_text if system_text else PRODUCT_PROMPT)
    answers = ctx.chat(engine).answer(list(questions), system=system, temperature=temperature)
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
    from bot.identity import system_prompt

    profile = ctx.store.identity.current()
    history = ctx.store.identity.history()
    if as_json:
        echo_json({"name": profile.name, "author": profile.author, "description": profile.description,
                   "system_prompt": system_prompt(profile), "history": history})
    else:
        click.echo(f"name:        {profile.name}\nauthor:      {profile.author}\ndescription: {profile.description}")
        click.echo(f"prompt:      {system_prompt(profile)}\nchanges:     {len(history)}")


@identity.command("set")
@click.option("--name", help="The bot's name.")
@click.option("--author", help="Who made the bot.")
@click.option("--description", help="One or two sentences added to the system prompt.")
@pass_ctx
def identity_set(ctx: Context, name, author, description):
    """Change the identity (name, author, description). Retrain to teach it to the model.

        selfcog identity set --name Aurora --author "Acme Labs"
    """
    from bot.admin import Admin

    if name is None and author is None and description is None:
        raise click.UsageError("give at least one of --name, --author, --description")
    profile = Admin(ctx.store).set_identity(name=name, author=author, description=description, by="cli")
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
    rows = ctx.store.corrections.list(status=None if status == "all" else status, channel=channel, limit=limit)
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

        selfcog corrections import identity.json --approve
    """
    from bot.admin import Admin
    from bot.corrections_io import read_pairs

    admin = Admin(ctx.store)
    pairs = read_pairs(file, ctx.store.identity.current())
    results = [admin.add_correction(q, a, by="cli", approve=approve) for q, a in pairs]
    summary = {"read": len(pairs), "added": sum(created for _, created in results),
               "duplicates": sum(not created for _, created in results), "ids": [i for i, _ in results],
               "status": "approved" if approve else "pending"}
    if as_json:
        echo_json(summary)
    else:
        click.echo(f"read {summary['read']} pairs: {summary['added']} added as {summary['status']}, "
                   f"{summary['duplicates']} already present")


def _review(ctx: Context, ids, status):
    from bot.admin import Admin

    done = Admin(ctx.store).review(list(ids), status, reviewer="cli")
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

    rows = ctx.store.corrections.list(status=None if status == "all" else status)
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

        selfcog retrain --json
        selfcog retrain --adapter runs/multi-gpu/checkpoint-42   # gate an adapter trained elsewhere
    """
    from bot.admin import Admin

    admin = Admin(ctx.store)
    if cancel:
        run = admin.cancel_retrain(by="cli")
        click.echo(f"retrain #{run['id']}: {'cancelled' if run['status'] == 'cancelled' else 'cancel requested'}")
        return
    if queue_only:
        run = admin.request_retrain(trigger="cli", requested_by="cli")
        click.echo(f"retrain #{run['id']} queued; `selfcog serve` picks it up")
        return
    from finetune.jobs import run_retrain
    from selfcog.serve import job_settings

    if trained is None and ctx.store.corrections.count("approved") == 0:
        raise click.ClickException("no approved corrections yet: approve some (selfcog corrections approve ID...) "
                                   "or import a reviewed file with --approve, then retrain")
    run = ctx.store.runs.request("cli", "cli", claim=True)  # the lock: raises if one is already running
    try:
        model = ctx.resolve_model()
        engine = ctx.engine()
    except BaseException as e:
        ctx.store.runs.finish(run["id"], "failed", error=str(e))
        raise
    report = run_retrain(run, store=ctx.store, engine=engine, model=model,
                         settings=job_settings(ctx.settings, engine), trained=trained)
    if as_json:
        echo_json({k: report.get(k) for k in ("run_id", "status", "promoted", "adapter", "metrics", "seconds")}
                  | {"reason": report.get("reason") or "; ".join(report.get("reasons") or []) or None})
    else:
        if report.get("table"):
            click.echo(report["table"] + "\n")
        outcome = f"promoted: adapter v{report['adapter']} is live" if report["promoted"] else report["status"]
        why = report.get("reason") or "; ".join(report.get("reasons") or [])
        click.echo(f"retrain #{report['run_id']} {outcome} in {report['seconds']} s" + (f" ({why})" if why else ""))
    if report["status"] == "failed":
        sys.exit(1)


@cli.command("eval")
@click.option("--adapter", help="A version number, 'base', or an adapter folder (default: the active adapter).")
@json_option
@pass_ctx
def eval_command(ctx: Context, adapter, as_json):
    """Score base, active and (optionally) another adapter on the held-out identity probes and general prompts.

        selfcog eval --adapter 3
    """
    from bot.engine import AdapterRef
    from finetune.evaluate import report_table
    from finetune.jobs import evaluate_weights, general_answers

    target = None
    if adapter and adapter != "base":
        target = ctx.store.adapters.get(int(adapter))["path"] if adapter.isdigit() else adapter
        if not adapter.isdigit():
            from bot.engine import check_adapter_folder

            try:
                check_adapter_folder(target)
            except (OSError, ValueError) as e:
                raise click.ClickException(str(e)) from None
    model = ctx.resolve_model()
    engine = ctx.engine()
    profile = ctx.store.identity.current()
    base_general = general_answers(engine, model, ctx.settings.cache_dir)
    active = ctx.store.adapters.active()
    reports = {"base": evaluate_weights(engine, AdapterRef.BASE, profile, base_general, ctx.settings.cache_dir,
                                        cache_as=f"{model.name}/base")}
    if active:
        reports[f"active v{active['version']}"] = evaluate_weights(
            engine, AdapterRef.ACTIVE, profile, base_general, ctx.settings.cache_dir,
            cache_as=f"{model.name}/v{active['version']}")
    if target:
        reports[f"v{adapter}" if adapter.isdigit() else "adapter"] = evaluate_weights(engine, target, profile, base_general)
    if as_json:
        echo_json({name: report.to_dict() for name, report in reports.items()})
    else:
        click.echo(report_table(reports))


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
    rows = ctx.store.adapters.list()
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
    Admin(ctx.store).activate(None if version == "base" else int(version), by="cli")
    click.echo(f"{'the base model' if version == 'base' else 'adapter v' + version} is now live")


@adapters.command("rollback")
@pass_ctx
def adapters_rollback(ctx: Context):
    """Go back to what was live before the last activation.

        selfcog adapters rollback
    """
    from bot.admin import Admin

    row = Admin(ctx.store).rollback(by="cli")
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
    from bot.admin import Admin

    profile = ctx.store.identity.current()
    active = ctx.store.adapters.active()
    run = Admin(ctx.store).retrain_status()
    info = {"name": profile.name, "author": profile.author, "adapter": active["version"] if active else None,
            "pending_corrections": ctx.store.corrections.count("pending"),
            "approved_corrections": ctx.store.corrections.count("approved"),
            "retrain": {k: run.get(k) for k in ("id", "status", "stage", "step", "total_steps", "loss", "error")} if run else None}
    if as_json:
        echo_json(info)
        return
    click.echo(f"{profile.name} by {profile.author}; live: {'adapter v%s' % info['adapter'] if active else 'base model'}")
    click.echo(f"corrections: {info['pending_corrections']} pending, {info['approved_corrections']} approved")
    if run:
        click.echo(f"retrain #{run['id']}: {run['status']}" + (f" ({run['stage']} {run['step'] or 0}/{run['total_steps'] or '?'})"
                                                               if run['status'] == 'running' else "")
                   + (f" - {run['error']}" if run.get("error") else ""))


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
