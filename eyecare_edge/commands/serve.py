"""`eyecare-edge serve`: the OpenAI-compatible local server (needs the `serve` extra; no torch)."""

from __future__ import annotations

import logging
import socket
import stat
from pathlib import Path

import click

from eyecare_edge.commands.options import pipeline_options, runtime_options
from eyecare_edge.errors import EyecareError


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound here rather than by uvicorn. Why: uvicorn reports a port in
    use (or an address not on this machine) only in its log and exits 3, the code this CLI
    means "some items failed"; bound here it is one `error:` line and exit 1 before anything
    loads, `[::1]` works as written, and `--port 0` can say which port it got."""
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as e:
        raise click.UsageError(f"--host {host}: not an address of this machine ({e.strerror})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise EyecareError(f"cannot listen on {host}:{port} ({e.strerror or e})") from e
    sock.set_inheritable(True)
    return sock


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def key_file_warning(path: Path) -> str | None:
    """Why a key file's permissions are unsafe, or None. A warning, not a refusal: container
    secret mounts are often 0644 with no other user to read them."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return (
            f"warning: --api-key-file {path} is readable by other users (mode {stat.S_IMODE(mode):04o}); "
            f"anyone on this machine can read the key: chmod 600 {path}"
        )
    return None


def read_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    if api_key and api_key_file:
        raise click.UsageError("give --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise click.UsageError(
                f"--api-key-file {api_key_file}: cannot read it ({e.strerror or e})"
            ) from None
        if not api_key:
            raise click.UsageError(f"--api-key-file {api_key_file}: the file is empty")
    if api_key is not None and len(api_key) < 8:
        raise click.UsageError("the API key must be at least 8 characters")
    return api_key or None


def _clinical_config(
    protocol_files: list[Path], sr_dir: Path | None, fhir_dir: Path | None, anonymize: bool, max_frames: int
):
    """(ClinicalConfig or None, why not). Asked for (any clinical option): a bad protocol is a
    usage error (exit 2), a missing extra or an unwritable folder exit 1. Not asked for: the
    packaged protocol if the clinical extra is installed, else the endpoint says what to install."""
    asked = bool(protocol_files or sr_dir or fhir_dir or anonymize)
    try:
        from eyecare_edge.clinical import ProtocolError
        from eyecare_edge.serve.screen import load_clinical_config
    except ImportError as e:
        reason = f"the clinical extra is not installed: pip install 'eyecare-edge[clinical]' ({e})"
        if asked:
            raise EyecareError(reason) from e
        return None, reason
    try:  # ClinicalOutputError (an unwritable folder) is an EyecareError: exit 1
        return load_clinical_config(protocol_files, sr_dir, fhir_dir, anonymize, max_frames), ""
    except ProtocolError as e:
        if not asked:
            return None, str(e)
        raise click.UsageError(f"--protocol: {e}") from None


@click.command("serve")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Pipelines answering at once (in this process; each has its own llama.cpp context).",
)
@click.option(
    "--api-key",
    envvar="EYECARE_API_KEY",
    default=None,
    help="Require 'Authorization: Bearer KEY' (env EYECARE_API_KEY).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Read the API key from this file.",
)
@click.option(
    "--allowed-media-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Allow image_url local paths, only inside this directory.",
)
@click.option(
    "--max-body-mb",
    type=click.FloatRange(min=0.01),
    default=32.0,
    show_default=True,
    help="Largest request body (413 beyond).",
)
@click.option(
    "--queue",
    type=click.IntRange(min=0),
    default=8,
    show_default=True,
    help="Requests waiting beyond --workers (429 beyond).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Per-request limit in seconds, queueing included.",
)
@click.option(
    "--body-timeout",
    "body_timeout_s",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds a request body may take to arrive (408 beyond; a slow sender cannot hold a connection).",
)
@click.option(
    "--max-images",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Images per request at most.",
)
@click.option(
    "--prefix-cache-mb",
    type=click.FloatRange(min=0),
    default=2048.0,
    show_default=True,
    help="Memory for reused image prefixes (0: off).",
)
@click.option(
    "--protocol",
    "protocol_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Screening protocol YAML for POST /v1/screen (repeatable; the first is the default) "
    "[the packaged DR protocol].",
)
@click.option(
    "--sr-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="POST /v1/screen files a DICOM SR per image here.",
)
@click.option(
    "--fhir-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="POST /v1/screen files a FHIR R4 Bundle per image here.",
)
@click.option(
    "--anonymize",
    is_flag=True,
    help="Drop patient/study identifiers and replace UIDs in every screening's files and answer.",
)
@click.option(
    "--max-frames",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Frames of one image POST /v1/screen answers at most (multi-frame OCT).",
)
@click.option("--model-id", default=None, help="Model name clients send [the bundle directory's name].")
@click.option(
    "--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info", show_default=True
)
@runtime_options
def serve(
    bundle: Path,
    host: str,
    port: int,
    workers: int,
    api_key: str | None,
    api_key_file: Path | None,
    allowed_media_dir: Path | None,
    max_body_mb: float,
    queue: int,
    timeout_s: float,
    body_timeout_s: float,
    max_images: int,
    prefix_cache_mb: float,
    protocol_files: tuple[Path, ...],
    sr_dir: Path | None,
    fhir_dir: Path | None,
    anonymize: bool,
    max_frames: int,
    model_id: str | None,
    log_level: str,
    **runtime: object,
) -> None:
    """Serve BUNDLE over an OpenAI-compatible HTTP API (POST /v1/chat/completions, GET /v1/models,
    /health, /metrics) and a page at / for asking about a photo in a browser. POST /v1/screen runs
    a screening protocol on one image (constrained, coded answers) and files a DICOM SR and a FHIR
    report in --sr-dir / --fhir-dir.

    \b
    Examples:
      eyecare-edge serve bundles/eyecare-3.8b
      eyecare-edge serve bundles/eyecare-3.8b --host 0.0.0.0 --api-key-file /etc/eyecare/key --workers 2
      eyecare-edge serve bundles/eyecare-3.8b --sr-dir /srv/results/sr --fhir-dir /srv/results/fhir
    Safe by default: binds 127.0.0.1; any other address needs an API key. Exit codes: 0 stopped;
    1 the bundle cannot be loaded; 2 bad usage.
    """
    try:
        import uvicorn

        from eyecare_edge.serve.app import ServeConfig, ServerState, create_app
    except ImportError as e:
        raise EyecareError(f"the server needs the serve extra: pip install 'eyecare-edge[serve]' ({e})") from e
    from eyecare_edge.bundle import read_manifest
    from eyecare_edge.llm import physical_cores
    from eyecare_edge.pipeline import Pipeline, choose_llm
    from eyecare_edge.prefix_cache import PrefixCache
    from eyecare_edge.serve.limits import is_loopback_host
    from eyecare_edge.serve.media import MediaPolicy

    key = read_key(api_key, api_key_file)
    warning = key_file_warning(api_key_file) if api_key_file is not None else None
    if warning:
        click.echo(warning, err=True)
    loopback = is_loopback_host(host)
    if not loopback and key is None:
        raise click.UsageError(
            f"--host {host} is reachable from other machines; refusing to serve it without an API key "
            "(give --api-key-file FILE or --api-key KEY, or bind 127.0.0.1)"
        )
    opts = pipeline_options(runtime)  # checks --visual-tokens before the port opens
    if opts.n_threads is None:
        opts.n_threads = max(1, physical_cores() // workers)
    if opts.vision_threads is None:
        opts.vision_threads = max(1, physical_cores() // workers)
    manifest = read_manifest(bundle)  # BundleError: exit 1, before the port opens
    choose_llm(manifest, opts.llm)

    clinical, clinical_reason = _clinical_config(
        list(protocol_files), sr_dir, fhir_dir, anonymize, max_frames
    )
    cache = PrefixCache(int(prefix_cache_mb * 2**20)) if prefix_cache_mb > 0 else None

    def load() -> list[Pipeline]:
        pipes: list[Pipeline] = []
        try:
            for i in range(workers):
                pipe = Pipeline.load(
                    bundle, opts, progress=lambda m: click.echo(m, err=True), verify=opts.verify and i == 0
                )
                pipe.prefix_cache = cache
                pipes.append(pipe)
            if clinical is not None:  # an option letter that is not one token: refuse now, not per request
                from eyecare_edge.serve.screen import check_protocols

                check_protocols(pipes[0], clinical)
        except BaseException:
            for p in pipes:
                p.close()
            raise
        return pipes

    config = ServeConfig(
        bundle=bundle,
        model_id=model_id or bundle.resolve().name,
        manifest=manifest,
        api_key=key,
        workers=workers,
        queue=queue,
        timeout_s=timeout_s,
        max_body_bytes=int(max_body_mb * 2**20),
        body_timeout_s=body_timeout_s,
        max_images=max_images,
        media=MediaPolicy(allowed_media_dir, opts.max_pixels),
        loopback_only=loopback,
        clinical=clinical,
        clinical_unavailable=clinical_reason,
    )
    state = ServerState(config, load)
    sock = bind_socket(host, port)
    port = sock.getsockname()[1]
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state),
            host=host,
            port=port,
            log_level=log_level,
            access_log=log_level == "debug",
            timeout_graceful_shutdown=5,
        )
    )
    state.on_fatal = lambda: setattr(server, "should_exit", True)
    click.echo(
        f"eyecare-edge serve: http://{_url_host(host)}:{port} model {config.model_id!r}, {workers} worker(s), "
        f"queue {queue}, API key {'required' if key else 'off'}, local media "
        f"{allowed_media_dir or 'off'}; screening "
        + (
            f"protocol(s) {', '.join(clinical.protocols)}, SR {'on' if sr_dir else 'off'}, "
            f"FHIR {'on' if fhir_dir else 'off'}{', anonymized' if anonymize else ''}"
            if clinical is not None
            else f"off ({clinical_reason})"
        ),
        err=True,
    )
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if state.status == "error":
        raise EyecareError(state.load_error)
