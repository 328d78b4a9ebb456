"""The one machine choice (fits, cheapest, nearest on failure), held against every flavor's table."""

from __future__ import annotations

import pytest

from airflow_stepops.machines import Catalogue, Machine
from airflow_stepops.resources import GPU_TYPES, ResourceSettings
from airflow_stepops.settings import azureml_vms, sagemaker_instances, vertex_machines

CATALOGUES = [sagemaker_instances.CATALOGUE, azureml_vms.CATALOGUE, vertex_machines.CATALOGUE]


def shape(catalogue: Catalogue, machine: Machine, **more: object) -> ResourceSettings:
    """What ``machine`` has, asked for as ResourceSettings (a fraction of a GPU is not asked for)."""
    names = {cloud: ours for ours, cloud in catalogue.gpu_names.items()}
    gpu_type = names.get(machine.gpu_type or "", machine.gpu_type) if machine.gpus >= 1 else None
    asked = {"cpu_count": None if machine.burstable else machine.vcpus, "memory": f"{machine.memory}{machine.unit}",
             "gpu_count": int(machine.gpus) if machine.gpus >= 1 else (None if machine.gpus else 0),
             "gpu_type": gpu_type if gpu_type in GPU_TYPES else None}
    return ResourceSettings(**{**asked, **more})


@pytest.mark.parametrize("catalogue", CATALOGUES, ids=lambda c: c.cloud)
def test_the_cheapest_fitting_machine_is_chosen_and_failures_name_the_nearest(catalogue: Catalogue):
    for machine in catalogue.machines:
        asked = shape(catalogue, machine)
        # fits: a machine has what it has, and not one vCPU or GiB more
        assert catalogue.fits(machine, asked), (machine, asked)
        assert not catalogue.fits(machine, shape(catalogue, machine, cpu_count=machine.vcpus + 1)), machine
        assert not catalogue.fits(machine, shape(catalogue, machine, memory=f"{machine.memory + 1}{machine.unit}"))
        # cheapest: what is chosen for a machine's own shape fits it and costs no more
        chosen = catalogue.choose(asked)
        assert catalogue.fits(chosen, asked) and chosen.price <= machine.price, (machine, chosen)
    # nearest: more vCPUs than any machine has names the largest of those without GPUs, and the field to set
    largest = max(m.vcpus for m in catalogue.machines if not m.gpus)
    with pytest.raises(ValueError, match=rf"no {catalogue.cloud} {catalogue.kind} fits; nearest: (\S+) \({largest} vCPU"
                                         rf".*set {catalogue.setting} to choose one yourself"):
        catalogue.choose(ResourceSettings(cpu_count=largest + 1, gpu_count=0))
    with pytest.raises(ValueError, match=r"gpu_type: K80 is not offered by .* in the table; GPU types: "):
        catalogue.choose(ResourceSettings(gpu_type="K80"))
