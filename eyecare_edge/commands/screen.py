"""`eyecare-edge screen`: a bundle over many images -> resumable JSONL, one line per answer (no torch)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from eyecare_edge.commands.options import MAX_TOKENS, pipeline_options, runtime_options
from eyecare_edge.commands.screen_ray import ray_options
from eyecare_edge.errors import EyecareError, ItemsFailed
from eyecare_edge.prompts import TASKS


@click.command("screen")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(path_type=Path),
    help="Results JSONL; with --engine ray a directory of parts.",
)
@click.option(
    "--task",
    type=click.Choice(sorted(TASKS, key=lambda t: t != "report")),
    default="report",
    show_default=True,
    help="report: the bundle's report prompt; open: --questions or a default open question; closed: --questions with options.",
)
@click.option(
    "--questions",
    "questions_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Questions: JSON list / JSONL of {question, options?, id?}, or a text file with one per line.",
)
@click.option(
    "-q",
    "--question",
    "question_texts",
    multiple=True,
    help="A question (repeatable); instead of --questions.",
)
@click.option("--resume", is_flag=True, help="Continue OUTPUT: skip items already in it.")
@click.option("--retry-errors", is_flag=True, help="With --resume: run items that ended in an error again.")
@MAX_TOKENS.option()
@click.option("--no-progress", is_flag=True, help="No progress bar (stderr).")
@click.option(
    "--protocol",
    "protocol_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Screening protocol YAML (questions, options, codes); closed answers are constrained to its options. "
    "Default with --sr-dir/--fhir-dir: the packaged DR-screening protocol.",
)
@click.option(
    "--sr-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write one DICOM SR per file here (needs the 'clinical' extra).",
)
@click.option(
    "--fhir-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Write one FHIR R4 transaction Bundle (DiagnosticReport + Observations) per file here.",
)
@click.option(
    "--anonymize",
    is_flag=True,
    help="Drop patient/study identifiers and paths from every output (SR, FHIR, JSONL); UIDs are replaced consistently.",
)
@click.option(
    "--engine",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="local: this process, one JSONL. ray: a Ray Data actor pool (pip install 'eyecare-edge[ray]'), -o is a directory of parts.",
)
@ray_options
@runtime_options
def screen(
    bundle: Path,
    inputs: tuple[str, ...],
    output: Path,
    task: str,
    questions_file: Path | None,
    question_texts: tuple[str, ...],
    resume: bool,
    retry_errors: bool,
    max_tokens: int | None,
    no_progress: bool,
    protocol_file: Path | None,
    sr_dir: Path | None,
    fhir_dir: Path | None,
    anonymize: bool,
    engine: str,
    address: str | None,
    workers: int | None,
    threads_per_worker: int | None,
    gpus_per_worker: float | None,
    part_format: str | None,
    sources_per_batch: int | None,
    **runtime: object,
) -> None:
    """Answer questions about every image in INPUTS (files, folders, globs; DICOM included).

    One JSONL line per (image frame, question) is written and fsynced as soon as it is done,
    with id, path, image sha256, question, answer, timings, bundle digest and error. A file that
    cannot be decoded gets error lines and the run goes on. A killed run loses nothing:
    rerun with --resume and it skips what is done (errored items too, unless --retry-errors).

    \b
    INPUTS may also be manifests: CSV/TSV/JSONL/Parquet with a `path` and an optional `id`
    column, or a .txt file list. --engine ray runs the same items on a Ray cluster (a laptop,
    `ray start --head`, KubeRay) into a directory of parts; see README "Archive-scale screening".

    \b
    Examples:
      eyecare-edge screen bundles/eyecare-3.8b clinic/2024-06/ -o reports.jsonl
      eyecare-edge screen bundles/eyecare-3.8b archive.csv -o out/ --engine ray --workers 8 --threads-per-worker 4
      eyecare-edge screen bundles/eyecare-3.8b 'scans/**/*.dcm' -o dr.jsonl --task closed --questions dr.json --resume
    Exit codes: 0 every item succeeded; 3 finished with per-item errors; 1 could not start
    (bad bundle, unwritable output); 2 bad usage.
    """
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.distributed.inputs import scan_paths
    from eyecare_edge.pipeline import Pipeline
    from eyecare_edge.screening import (
        InputScan,
        Question,
        ResultsFile,
        ScreenError,
        default_questions,
        load_questions,
        run_screen,
    )

    if retry_errors and not resume:
        raise click.UsageError("--retry-errors needs --resume")
    if questions_file is not None and question_texts:
        raise click.UsageError("give --questions FILE or -q QUESTION, not both")
    clinical = None
    if protocol_file is not None or sr_dir is not None or fhir_dir is not None:
        if questions_file is not None or question_texts:
            raise click.UsageError(
                "--protocol/--sr-dir/--fhir-dir ask the protocol's questions; drop --questions/-q"
            )
        from eyecare_edge.clinical.protocol import ProtocolError
        from eyecare_edge.clinical.screen_hook import ScreenClinical

        try:  # ClinicalOutputError (an unwritable folder) is an EyecareError: exit 1
            clinical = ScreenClinical.prepare(protocol_file, sr_dir, fhir_dir, anonymize)
        except ProtocolError as e:
            raise click.UsageError(str(e)) from e
        task = "protocol"
    if engine == "ray" and (clinical is not None or anonymize):
        raise click.UsageError(
            "--protocol/--sr-dir/--fhir-dir/--anonymize run on the local engine only; drop --engine ray"
        )
    ray_given = [address, workers, threads_per_worker, gpus_per_worker, part_format, sources_per_batch]
    if engine == "local" and any(v is not None for v in ray_given):
        raise click.UsageError(
            "--address/--workers/--threads-per-worker/--gpus-per-worker/--sources-per-batch/--part-format need --engine ray"
        )
    try:
        scan = InputScan([], []) if engine == "ray" else scan_paths(inputs)  # ray: sources are resolved there
        files = scan.files
        if questions_file is not None:
            questions = load_questions(questions_file, task)
        elif question_texts:
            if task == "closed":
                raise ScreenError("--task closed needs --questions FILE (questions with options)")
            questions = [Question(q, q) for q in question_texts]
        else:
            questions = None  # the task's default, once the bundle's report prompt is known
    except ScreenError as e:
        raise click.UsageError(str(e)) from e

    manifest = read_manifest(bundle)  # BundleError: exit 1
    try:
        if clinical is not None:
            questions = clinical.questions()
        elif questions is None:
            questions = default_questions(task, manifest.prompt.report_prompt)
        if engine == "ray":
            from eyecare_edge.commands.screen_ray import screen_on_ray

            screen_on_ray(
                bundle=bundle,
                inputs=inputs,
                output=output,
                digest=manifest.digest(),
                questions=questions,
                task=task,
                max_tokens=max_tokens or (512 if task == "report" else 256),
                resume=resume,
                retry_errors=retry_errors,
                no_progress=no_progress,
                runtime=runtime,
                address=address,
                workers=workers or 1,
                threads_per_worker=threads_per_worker or 1,
                gpus_per_worker=gpus_per_worker or 0.0,
                part_format=part_format or "jsonl",
                sources_per_batch=sources_per_batch or 1,
            )
            return
        # Checked before the model loads: a refused output should not cost a minute of loading.
        results_cls = ResultsFile
        if anonymize:
            from eyecare_edge.clinical.anonymize import AnonymizingResults as results_cls
        results = results_cls(output, digest=manifest.digest(), resume=resume, retry_errors=retry_errors)
    except ScreenError as e:
        raise click.UsageError(str(e)) from e
    except OSError as e:
        raise EyecareError(str(e)) from e
    if results.truncated_bytes:
        click.echo(
            f"{output}: dropped a cut last line ({results.truncated_bytes} bytes); it runs again", err=True
        )
    if results.dropped_errors:
        click.echo(f"{output}: retrying {results.dropped_errors} item(s) that ended in an error", err=True)

    def notice(msg: str) -> None:
        click.echo(msg, err=True)

    try:
        pipe = Pipeline.load(bundle, pipeline_options(runtime), progress=notice)
    except BaseException:  # EyecareError: exit 1, with the output closed
        results.close()
        raise
    with pipe:
        click.echo(pipe.describe(), err=True)
        extra = {
            "vision": f"{pipe.vision.encoder.name} {pipe.vision.encoder.precision}",
            "llm": pipe.llm_entry.precision,
        }
        limit = max_tokens or (512 if task == "report" else 256)
        hooks = {}
        if clinical is not None:
            try:
                hooks = clinical.attach(pipe, results_path=output, resume=resume, max_tokens=limit)
            except (ValueError, OSError) as e:  # an option letter the vocabulary lacks; an unwritable folder
                results.close()
                if isinstance(e, EyecareError):
                    raise
                raise EyecareError(str(e)) from e
        with results, _progress_bar(len(files) * len(questions), disabled=no_progress) as progress:
            try:
                summary = run_screen(
                    pipe,
                    files,
                    questions,
                    results,
                    task=task,
                    max_tokens=limit,
                    progress=progress,
                    extra_fields=extra,
                    **hooks,
                    skipped_files=scan.skipped,
                )
            except KeyboardInterrupt:
                click.echo(f"\ninterrupted; finished items are in {output}: rerun with --resume", err=True)
                sys.exit(130)
    s = summary
    click.echo(
        f"{s.n_items} item(s) in {s.seconds:.1f} s ({s.items_per_min:.1f}/min): {s.n_ok} ok, {s.n_errors} error(s)"
        + (f", {s.n_skipped} already done" if s.n_skipped else "")
        + (
            f", {s.n_previous_errors} earlier error(s) kept (--retry-errors runs them again)"
            if s.n_previous_errors
            else ""
        )
        + f"; results in {output}",
        err=True,
    )
    if s.skipped_files:
        click.echo(f"{s.n_skipped_files} file(s) in the folders skipped (not images screen reads):", err=True)
        for sk in s.skipped_files[:10]:
            click.echo(f"  skipped: {sk.path}: {sk.reason}", err=True)
        if s.n_skipped_files > 10:
            click.echo(f"  ... and {s.n_skipped_files - 10} more", err=True)
    shown = s.errors[:10]
    if anonymize:  # the lines name their files; the JSONL has them pseudonymized, so must stderr
        from eyecare_edge.clinical.anonymize import scrub_paths

        shown = [scrub_paths(line, [str(f) for f in files]) for line in shown]
    for line in shown:
        click.echo(f"  error: {line}", err=True)
    if s.n_errors > len(shown):
        click.echo(f"  ... and {s.n_errors - len(shown)} more (see the 'error' field)", err=True)
    if clinical is not None and (sr_dir is not None or fhir_dir is not None):
        click.echo(
            f"{clinical.n_written} file(s) written to "
            + " and ".join(str(d) for d in (sr_dir, fhir_dir) if d is not None),
            err=True,
        )
        for line in clinical.failures[:10]:
            click.echo(f"  error: {line}", err=True)
        if clinical.failures:
            n = len(clinical.failures)
            raise ItemsFailed(n, clinical.n_written + n, what="clinical files")
    if s.exit_code:
        raise ItemsFailed(s.n_errors + s.n_previous_errors, s.n_items + s.n_skipped, where=str(output))


class _progress_bar:
    """A rich progress bar on stderr with ETA, adapted to `screening.Progress`. None without rich:
    the runtime install (`eyecare-edge[cpu]`, a camera PC) goes without it; the `bench` extra has it."""

    def __init__(self, total: int, *, disabled: bool) -> None:
        self.errors = 0
        try:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            self.bar = None
            return

        self.bar = Progress(
            TextColumn("screen"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[errors]} errors"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
            disable=disabled,
            transient=False,
        )
        self.task = self.bar.add_task("screen", total=total, errors=0)

    def __enter__(self):
        from eyecare_edge.screening import Progress as ScreenProgress

        if self.bar is None:
            return ScreenProgress()
        self.bar.start()
        return ScreenProgress(add_total=self._add_total, advance=self._advance)

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def _add_total(self, n: int) -> None:
        task = self.bar.tasks[0]
        self.bar.update(self.task, total=(task.total or 0) + n)

    def _advance(self, n: int, line: dict) -> None:
        if line.get("error") is not None:
            self.errors += 1
        self.bar.update(self.task, advance=n, errors=self.errors)
