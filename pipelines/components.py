"""torchx components of this project: ``torchx run pipelines/components.py:<name> ...``.

Each stage of the pipeline (``pipelines/run.py``) is one component, usable on its own::

    generate          synthetic Criteo-format rows       python -m trainer.data.synthetic
    preprocess        raw logs -> prepared dataset       python -m trainer.data.preprocess
    train             distributed training (dist.ddp)    trainer/main.py under torchrun
    collapse_monitor  offline IA report of a checkpoint  python -m trainer.collapse
    export            serving artifact                   python -m trainer.export
    sweep             the paper's scaling table          python -m pipelines.sweep
    pipeline          the whole chain as a driver job    python -m pipelines.run

For example, training on two 8-GPU hosts of a Kubernetes cluster with Volcano::

    torchx run -s kubernetes -cfg queue=ctr,namespace=ctr,service_account=ctr-trainer \\
        pipelines/components.py:train -j 2x8 --gpu 8 --memMB 480000 \\
        --image REGISTRY/ctr-multiembed:TAG --config configs/criteo_me.yaml \\
        --data s3://BUCKET/criteo --run_dir s3://BUCKET/runs/me4x --pushgateway pushgateway.ctr.svc:9091

``sweep``: the paper's scaling sweep (``python -m pipelines.sweep``) as one job::

    torchx run -s local_cwd pipelines/components.py:sweep --spec configs/sweeps/small.yaml
    torchx run -s kubernetes pipelines/components.py:sweep --spec /runs/paper.yaml \\
        --image REGISTRY/ctr-multiembed:TAG --gpu 8 --memMB 200000 --max_retries 3 \\
        --mounts type=volume,src=sweeps,dst=/runs --output /runs/paper -- --models dcnv2,dnn

The sweep trains its cells on the job's one host (``launcher.nproc`` ranks each through
``torchrun --standalone``, ``launcher.parallel`` cells at a time), so the job asks for one
host with ``nproc * parallel`` GPUs. It resumes where it stopped, so ``--max_retries``
makes a preempted job carry on.
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components import dist

# The image built from this repository's Dockerfile (local_cwd ignores it and uses the checkout).
IMAGE = "ctr-multiembed:latest"
# the experiment a torchx tracker (torchx.tracker.mlflow) files a run under (trainer/tracking.py)
TRACKING_EXPERIMENT_ENV = "TORCHX_TRACKING_EXPERIMENT_NAME"


def sweep(
    *args: str,
    spec: str,
    output: Optional[str] = None,
    image: str = IMAGE,
    name: str = "ctr-sweep",
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 32768,
    h: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Train every cell of a scaling-sweep spec and write its Table 1 (``python -m pipelines.sweep``).

    Args:
        args: more arguments for ``pipelines.sweep`` after ``--`` (e.g. ``--models dnn,dcnv2``,
            ``--seeds 0``, ``--set launcher.nproc=4``, ``--report-only``)
        spec: the sweep spec YAML, a path inside the image or the working directory
            (see configs/sweeps/)
        output: the output directory (default: the spec's ``output``); on a cluster, a
            mounted volume so that a retried job resumes
        image: the image with this repository installed
        name: the job name
        cpu: CPUs of the host
        gpu: GPUs of the host (the spec's ``launcher.nproc`` times ``launcher.parallel``)
        memMB: memory of the host in MB (set it: on Kubernetes a missing value becomes 0)
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        env: environment variables, e.g. ``CTR_PUSHGATEWAY=host:9091``
        max_retries: scheduler retries of the whole job (each one resumes the sweep)
        mounts: volumes, e.g. ``type=volume,src=sweeps,dst=/runs`` (see ``torchx.specs.parse_mounts``)
    """
    cmd = ["--spec", spec] + (["--output", output] if output else [])
    return _python_job("sweep", "pipelines.sweep", [*cmd, *args], image, cpu, gpu, memMB, env, mounts,
                       app_name=name, h=h, max_retries=max_retries)


def _python_job(role: str, module: str, args: list[str], image: str, cpu: int, gpu: int, memMB: int,
                env: Optional[Dict[str, str]], mounts: Optional[List[str]], app_name: Optional[str] = None,
                h: Optional[str] = None, max_retries: int = 0) -> specs.AppDef:
    """One replica of ``python -m MODULE ARGS``: the shape of every component but ``train``."""
    return specs.AppDef(
        name=app_name or role,
        roles=[
            specs.Role(
                name=role,
                image=image,
                entrypoint="python",
                args=["-m", module, *args],
                env=dict(env or {}),
                num_replicas=1,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts) if mounts else [],
            )
        ],
    )


def generate(
    rows: int,
    output: str,
    cardinality_scale: float = 0.01,
    seed: int = 0,
    image: str = IMAGE,
    cpu: int = 2,
    memMB: int = 4096,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Synthetic Criteo-format rows with a planted interaction model (``python -m trainer.data.synthetic``).

    Args:
        rows: number of rows
        output: the TSV to write (path or fsspec URL); its true click probabilities and
            oracle metrics are written beside it
        cardinality_scale: multiplies the Criteo Kaggle cardinalities
        seed: seed of the planted model and the rows
        image: the image with this repository installed
        cpu: CPUs
        memMB: memory in MB
        env: environment variables (e.g. object-store credentials from a Secret)
        mounts: volumes (see ``torchx.specs.parse_mounts``)
    """
    args = ["--rows", str(rows), "--output", output, "--format", "criteo-tsv",
            "--cardinality-scale", str(cardinality_scale), "--seed", str(seed), "--overwrite"]
    return _python_job("generate", "trainer.data.synthetic", args, image, cpu, 0, memMB, env, mounts)


def preprocess(
    input: Optional[str] = None,
    output: str = "",
    dataset: str = "criteo",
    spec: Optional[str] = None,
    min_count: Optional[int] = None,
    on_bad_rows: str = "fail",
    workers: int = 1,
    work: Optional[str] = None,
    image: str = IMAGE,
    cpu: int = 2,
    memMB: int = 16384,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Raw logs -> a prepared dataset, as a dataset spec says (``python -m trainer.data.preprocess``).

    With ``workers`` > 1, one job of that many replicas: each counts and encodes its share
    of the input files, replica 0 merges the vocabularies and writes the output; they meet
    in ``work`` (a volume or object store every replica sees). Same bytes as one worker.

    Args:
        input: the raw file(s): a path, a glob or an fsspec URL (.gz read as gzip);
            default: the spec's ``input.paths``
        output: the dataset directory to write (replaced if it exists)
        dataset: a shipped spec, configs/datasets/NAME.yaml (criteo, avazu, criteo_1tb, ...)
        spec: a dataset spec file instead (a path inside the image or the working directory)
        min_count: every vocabulary field's min count (default: the spec's)
        on_bad_rows: fail, or skip (count and drop them)
        workers: replicas sharing the input files out (one file is one worker's at a time)
        work: the directory the replicas share (default OUTPUT.work)
        image: the image with this repository installed
        cpu: CPUs per replica (two passes in parallel threads)
        memMB: memory per replica in MB (grows with the vocabularies, not the files)
        env: environment variables (e.g. object-store credentials from a Secret)
        mounts: volumes (see ``torchx.specs.parse_mounts``)
    """
    if not output:
        raise ValueError("output: the dataset directory to write is required")
    which = ["--spec", spec] if spec else ["--dataset", dataset]
    args = [*which, "--output", output, "--on-bad-rows", on_bad_rows, "--overwrite", "--no-progress"]
    if input:
        args += ["--input", input]
    if min_count is not None:
        args += ["--min-count", str(min_count)]
    if workers > 1:
        args += ["--workers", str(workers), "--worker", specs.macros.replica_id, "--run-id", specs.macros.app_id]
        args += ["--work", work] if work else []
    app = _python_job("preprocess", "trainer.data.preprocess", args, image, cpu, 0, memMB, env, mounts)
    app.roles[0].num_replicas = workers
    return app


def train(
    *overrides: str,
    data: str,
    run_dir: str,
    config: Optional[str] = None,
    j: str = "1x2",
    image: str = IMAGE,
    cpu: int = 8,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    run_id: Optional[str] = None,
    pushgateway: Optional[str] = None,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Distributed training (``trainer/main.py`` under ``dist.ddp``) with this project's defaults.

    Resumes from the run directory's latest checkpoint (``--resume auto``), so a retried or
    relaunched job carries on.

    Args:
        overrides: trainer config values, ``key=value`` (e.g. ``train.epochs=3``)
        data: the prepared dataset (path or fsspec URL)
        run_dir: the run directory (path or fsspec URL; a shared volume or object store on a cluster)
        config: the trainer config YAML (a path inside the image or the working directory;
            none: the trainer's defaults)
        j: ``[min:]NxP``: N hosts with P processes each (e.g. 2x8)
        image: the image with this repository installed
        cpu: CPUs per host
        gpu: GPUs per host (P on GPU hosts)
        memMB: memory per host in MB (set it: on Kubernetes a missing value becomes 0)
        h: a registered named resource (takes precedence over cpu, gpu and memMB)
        run_id: the ``run`` label of the exported metrics (default: the run directory's name)
        pushgateway: HOST:PORT of a Prometheus Pushgateway that rank 0 pushes to
        env: more environment variables (e.g. object-store credentials from a Secret;
            ``TORCHX_TRACKING_EXPERIMENT_NAME=NAME``: the experiment of a configured torchx tracker,
            instead of ``experiment_name`` in ``.torchxconfig``)
        max_retries: scheduler retries of the job (each resumes from the latest checkpoint)
        mounts: volumes (see ``torchx.specs.parse_mounts``)
    """
    job_env = dict(env or {})
    if run_id:
        job_env["CTR_RUN_ID"] = run_id
    if pushgateway:
        job_env["CTR_PUSHGATEWAY"] = pushgateway
    args = (["--config", config] if config else []) + ["--resume", "auto", "--set", f"data.path={data}", f"run.dir={run_dir}", *overrides]
    experiment = job_env.get(TRACKING_EXPERIMENT_ENV)
    app = dist.ddp(
        *args, script="trainer/main.py", image=image, name="train", cpu=cpu, gpu=gpu, memMB=memMB, h=h, j=j,
        env=job_env, max_retries=max_retries, mounts=mounts,
    )
    # dist.ddp files the run under the experiment "default-experiment", which would override the
    # experiment_name of .torchxconfig's [tracker:mlflow]: keep only one given with --env
    for role in app.roles:
        role.env.pop(TRACKING_EXPERIMENT_ENV, None)
        if experiment:
            role.env[TRACKING_EXPERIMENT_ENV] = experiment
    return app


def collapse_monitor(
    checkpoint: str,
    output: str,
    pushgateway: Optional[str] = None,
    run_id: Optional[str] = None,
    image: str = IMAGE,
    cpu: int = 2,
    memMB: int = 8192,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """Offline embedding-collapse report of a checkpoint (``python -m trainer.collapse``).

    Args:
        checkpoint: a checkpoint directory, or a run directory (its latest checkpoint)
        output: the report directory (collapse.json, PNGs, report.html; replaced if it exists)
        pushgateway: HOST:PORT of a Prometheus Pushgateway to push the collapse gauges to
        run_id: the ``run`` label of pushed gauges (default: the run directory's name)
        image: the image with this repository installed
        cpu: CPUs
        memMB: memory in MB (one field's tables at a time)
        env: environment variables (e.g. object-store credentials from a Secret)
        mounts: volumes (see ``torchx.specs.parse_mounts``)
    """
    args = ["--checkpoint", checkpoint, "--output", output, "--overwrite"]
    if pushgateway:
        args += ["--pushgateway", pushgateway]
    if run_id:
        args += ["--run-id", run_id]
    return _python_job("collapse", "trainer.collapse", args, image, cpu, 0, memMB, env, mounts)


def export(
    checkpoint: str,
    output: str,
    quantize: str = "none",
    dataset: Optional[str] = None,
    image: str = IMAGE,
    cpu: int = 2,
    memMB: int = 16384,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
) -> specs.AppDef:
    """A serving artifact from a checkpoint (``python -m trainer.export``).

    Args:
        checkpoint: a checkpoint directory, or a run directory (its best checkpoint)
        output: the artifact directory (replaced if it exists)
        quantize: none, or int8 (row-wise 8-bit tables; refused if it loses > 0.001 test AUC)
        dataset: the training dataset (default: the run's config.yaml data.path)
        image: the image with this repository installed
        cpu: CPUs
        memMB: memory in MB (the whole unsharded model is loaded)
        env: environment variables (e.g. object-store credentials from a Secret)
        mounts: volumes (see ``torchx.specs.parse_mounts``)
    """
    args = ["--checkpoint", checkpoint, "--output", output, "--quantize", quantize, "--overwrite"]
    if dataset:
        args += ["--dataset", dataset]
    return _python_job("export", "trainer.export", args, image, cpu, 0, memMB, env, mounts)


def pipeline(
    config: str,
    scheduler: str = "local_cwd",
    image: str = IMAGE,
    cpu: int = 1,
    memMB: int = 2048,
    env: Optional[Dict[str, str]] = None,
) -> specs.AppDef:
    """The whole pipeline as one driver job (``python -m pipelines.run``): it submits each stage to ``scheduler``.

    Args:
        config: the pipeline YAML (see configs/pipelines/)
        scheduler: where the stages run (local_cwd or kubernetes; the driver needs the
            service account's rights to create jobs there)
        image: the image with this repository installed
        cpu: CPUs of the driver
        memMB: memory of the driver in MB
        env: environment variables
    """
    return _python_job("pipeline", "pipelines.run", ["--config", config, "--scheduler", scheduler], image, cpu, 0, memMB, env, None)
