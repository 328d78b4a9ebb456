"""The image a step runs in when its step operator names none, and the Python an image's name promises.

A step is pickled by the workers' Python and loaded by the image's, so the default is chosen for the workers'
major.minor; cloudpickle, which these images lack, is installed when the job starts (``runtime/entry.py``).
"""

from __future__ import annotations

import re
import sys

#: Docker Hub's official Python image: Python with pip, ``python3`` and ``python``, and ``/bin/sh`` on a slim Debian
#: (https://hub.docker.com/_/python). Kubernetes, Vertex AI ("push it to Artifact Registry or Docker Hub",
#: https://cloud.google.com/vertex-ai/docs/training/containers-overview) and Azure ML ("a registry such as Docker
#: Hub", https://learn.microsoft.com/azure/machine-learning/how-to-manage-environments-v2) run Docker Hub images.
PYTHON_IMAGE = "python:{version}-slim"

#: SageMaker runs training images from Amazon ECR (or a private registry reached through the job's VPC), not
#: from Docker Hub (https://docs.aws.amazon.com/sagemaker/latest/dg/docker-containers-adapt-your-own-private-registry.html),
#: so its default is the AWS Deep Learning Container for PyTorch training on SageMaker of the workers' Python,
#: (cpu tag, gpu tag), the newest per Python in
#: https://github.com/aws/deep-learning-containers/blob/master/available_images.md (read 2026-12; 2.2 and 2.5 are
#: past AWS's end of support but still pulled). They have Python, pip, ``python3`` and a cloudpickle of their own,
#: which the runtime replaces with the workers' when its minor version differs.
SAGEMAKER_IMAGES = {
    "3.10": ("2.2.0-cpu-py310-ubuntu20.04-sagemaker", "2.2.0-gpu-py310-cu121-ubuntu20.04-sagemaker"),
    "3.11": ("2.5.1-cpu-py311-ubuntu22.04-sagemaker", "2.5.1-gpu-py311-cu124-ubuntu22.04-sagemaker"),
    "3.12": ("2.8.0-cpu-py312-ubuntu22.04-sagemaker", "2.8.0-gpu-py312-cu129-ubuntu22.04-sagemaker"),
}
SAGEMAKER_REPOSITORY = "{account}.dkr.ecr.{region}.amazonaws.com{suffix}/pytorch-training:{tag}"
#: the Deep Learning Containers' registry account: 763104351884, except in these regions
#: (https://github.com/aws/deep-learning-containers/blob/master/docs/reference/region_availability.md)
DLC_ACCOUNTS = {"af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-east-2": "975050140332",
                "ap-northeast-3": "364406365360", "ap-south-2": "772153158452", "ap-southeast-3": "907027046896",
                "ap-southeast-4": "457447274322", "ap-southeast-5": "550225433462", "ap-southeast-6": "633930458069",
                "ap-southeast-7": "590183813437", "ca-west-1": "204538143572", "cn-north-1": "727897471807",
                "cn-northwest-1": "727897471807", "eu-central-2": "380420809688", "eu-south-1": "692866216735",
                "eu-south-2": "503227376785", "il-central-1": "780543022126", "me-central-1": "914824155844",
                "me-south-1": "217643126080", "mx-central-1": "637423239942", "us-gov-east-1": "446045086412",
                "us-gov-west-1": "442386744353"}
DLC_ACCOUNT = "763104351884"

#: the Python an image's name promises: Docker Hub's official ``python:3.11...`` (also through ``docker.io`` or a
#: mirror's ``library/``; another registry's repository named ``python`` is someone else's), or a ``py311`` part of
#: its last component (Deep Learning Containers ``...-py311-...``, Vertex AI's prebuilt ``pytorch-gpu.2-1.py310``)
_PYTHON_REPO = re.compile(r"^(?:(?:docker\.io|index\.docker\.io|registry-1\.docker\.io)/)?(?:library/)?python:(3)\.(\d+)"
                          r"|/library/python:(3)\.(\d+)")
_PY_TAG = re.compile(r"(?:^|[-.:])py(3)(\d{1,2})(?=[-.:@]|$)")


def worker_python() -> str:
    return f"{sys.version_info[0]}.{sys.version_info[1]}"


def python_image() -> str:
    """Kubernetes, Vertex AI and Azure ML: Docker Hub's slim Python image of the workers' Python."""
    return PYTHON_IMAGE.format(version=worker_python())


def sagemaker_image(region: str, gpu: bool) -> str:
    """SageMaker: the PyTorch training Deep Learning Container of the workers' Python in ``region``."""
    tags = SAGEMAKER_IMAGES.get(worker_python())
    if tags is None:
        raise ValueError(f"image: SageMaker has no default image for Python {worker_python()} (the Airflow workers'); "
                         f"default images exist for Python {', '.join(SAGEMAKER_IMAGES)}: set \"image\" in the "
                         "connection extras to an ECR image with the workers' Python")
    return SAGEMAKER_REPOSITORY.format(account=DLC_ACCOUNTS.get(region, DLC_ACCOUNT), region=region,
                                       suffix=".cn" if region.startswith("cn-") else "", tag=tags[gpu])


def image_python(image: str) -> str | None:
    """The Python major.minor that ``image``'s name promises, if it names one."""
    repo = _PYTHON_REPO.search(image)
    if repo:
        major, minor = [g for g in repo.groups() if g is not None]
        return f"{major}.{minor}"
    py = _PY_TAG.search(image.rsplit("/", 1)[-1].split("@")[0])
    return f"{py.group(1)}.{py.group(2)}" if py else None


def check_image(image: str | None, where: str = "image") -> str | None:
    """Refuse an image whose name promises another Python than the workers': the step could not be loaded."""
    version = image_python(image) if image else None
    if version and version != worker_python():
        raise ValueError(f"{where}: {image!r} has Python {version}, but the Airflow workers run Python "
                         f"{worker_python()}, and a step pickled by one Python cannot be loaded by another; use an "
                         f"image with Python {worker_python()}, or leave \"image\" unset: the default image has the "
                         "workers' Python")
    return image
