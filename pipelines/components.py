"""torchx components of this project: ``torchx run pipelines/components.py:<name> ...``.

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

# The image built from this repository's Dockerfile (local_cwd ignores it and uses the checkout).
IMAGE = "ctr-multiembed:latest"


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
    cmd = ["-m", "pipelines.sweep", "--spec", spec]
    if output:
        cmd += ["--output", output]
    return specs.AppDef(
        name=name,
        roles=[
            specs.Role(
                name="sweep",
                image=image,
                entrypoint="python",
                args=[*cmd, *args],
                env=dict(env or {}),
                num_replicas=1,
                resource=specs.resource(cpu=cpu, gpu=gpu, memMB=memMB, h=h),
                max_retries=max_retries,
                mounts=specs.parse_mounts(mounts) if mounts else [],
            )
        ],
    )
