"""Azure VM sizes for Azure ML serverless jobs: what each offers, and the cheapest one that fits a step.

Prices are East US pay-as-you-go Linux list prices per hour (on-demand, and Azure Spot as the low-priority/spot
tier), used for cost estimates as well as to choose a size; where and when they were read is in ``PRICES``. A
size whose spot price the catalogue did not give (D48s_v3, the H100 sizes, ND A100 v4, NVadsA10 v5) has
``spot_price`` None: its spot cost is unknown, not guessed. The table covers the general purpose (D), memory
optimised (E) and compute optimised (F) families and the GPU families Azure ML offers for training: NCasT4_v3
(T4), NCv3 (V100), NC A100 v4 (A100 80GB), ND A100 v4 (8 x A100 40GB), NDm A100 v4 (8 x A100 80GB), NCads H100
v5, ND H100 v5 and NVadsA10 v5 (A10, partly as GPU fractions). Sizes are matched case-insensitively, as Azure
does; a size not in the table is refused before submitting (with the sizes of its family), since Azure ML
would only refuse it after the job was created.
"""

from __future__ import annotations

import re
from fractions import Fraction

from airflow_stepops.machines import Catalogue, Machine
from airflow_stepops.prices import PriceTable

#: Spot prices (and the on-demand prices, which agreed within 15% with the table's and were kept) are the eastus
#: rows of SkyPilot's Azure ML catalogue, github.com/skypilot-org/skypilot-catalog catalogs/v5/azure/az_ml_vms.csv
#: at commit a7fff1712e3b45ac6f26289f2515503b8b30f76a (its H100 rows give the on-demand price as the spot price:
#: not a spot price, left None). Billing: Azure VMs are metered per second; the 1-minute minimum is NOT verified
#: against a Microsoft page (third-party summaries say 1 minute; a Microsoft Q&A answer, learn.microsoft.com/en-us/
#: answers/questions/2259765, says a 5-minute minimum applies from 2025-06-01): check before relying on it.
PRICES = PriceTable("eastus", "2026-12", "https://azure.microsoft.com/pricing/details/machine-learning/ (spot: "
                    "skypilot-catalog catalogs/v5/azure/az_ml_vms.csv@a7fff17)", increment_seconds=1,
                    minimum_seconds=60)

#: what an Azure VM size name looks like (``Standard_NC24ads_A100_v4``); checked at parse time
VM_SIZE_NAME = re.compile(r"^Standard_[A-Za-z]+\d+[A-Za-z]*(_[A-Za-z0-9]+)*$", re.I)

#: name, vCPUs, memory GiB, GPUs, GPU type, on-demand USD/hour[, spot USD/hour]
_ROWS: list[tuple[str, int, float, Fraction | int, str | None, float] | tuple[
    str, int, float, Fraction | int, str | None, float, float]] = [
    # general purpose
    ("Standard_D2s_v3", 2, 8, 0, None, 0.096, 0.011616), ("Standard_D4s_v3", 4, 16, 0, None, 0.192, 0.023232),
    ("Standard_D8s_v3", 8, 32, 0, None, 0.384, 0.046464), ("Standard_D16s_v3", 16, 64, 0, None, 0.768, 0.092928),
    ("Standard_D32s_v3", 32, 128, 0, None, 1.536, 0.185856), ("Standard_D48s_v3", 48, 192, 0, None, 2.304),
    ("Standard_D64s_v3", 64, 256, 0, None, 3.072, 0.371712),
    ("Standard_DS1_v2", 1, 3.5, 0, None, 0.073, 0.008833), ("Standard_DS2_v2", 2, 7, 0, None, 0.146, 0.017666),
    ("Standard_DS3_v2", 4, 14, 0, None, 0.293, 0.035453), ("Standard_DS4_v2", 8, 28, 0, None, 0.585, 0.070785),
    ("Standard_DS5_v2", 16, 56, 0, None, 1.17, 0.14157),
    # memory optimised
    ("Standard_E2s_v3", 2, 16, 0, None, 0.126, 0.015246), ("Standard_E4s_v3", 4, 32, 0, None, 0.252, 0.030492),
    ("Standard_E8s_v3", 8, 64, 0, None, 0.504, 0.060984), ("Standard_E16s_v3", 16, 128, 0, None, 1.008, 0.121968),
    ("Standard_E32s_v3", 32, 256, 0, None, 2.016, 0.243936), ("Standard_E48s_v3", 48, 384, 0, None, 3.024, 0.365904),
    ("Standard_E64s_v3", 64, 432, 0, None, 3.629, 0.439109),
    # compute optimised
    ("Standard_F2s_v2", 2, 4, 0, None, 0.085, 0.010237), ("Standard_F4s_v2", 4, 8, 0, None, 0.169, 0.020449),
    ("Standard_F8s_v2", 8, 16, 0, None, 0.338, 0.040898), ("Standard_F16s_v2", 16, 32, 0, None, 0.677, 0.081917),
    ("Standard_F32s_v2", 32, 64, 0, None, 1.353, 0.163713), ("Standard_F48s_v2", 48, 96, 0, None, 2.03, 0.24563),
    ("Standard_F64s_v2", 64, 128, 0, None, 2.706, 0.327426), ("Standard_F72s_v2", 72, 144, 0, None, 3.045, 0.368445),
    # NCasT4_v3: T4
    ("Standard_NC4as_T4_v3", 4, 28, 1, "T4", 0.526, 0.068959),
    ("Standard_NC8as_T4_v3", 8, 56, 1, "T4", 0.752, 0.098587),
    ("Standard_NC16as_T4_v3", 16, 110, 1, "T4", 1.204, 0.157844),
    ("Standard_NC64as_T4_v3", 64, 440, 4, "T4", 4.352, 0.570547),
    # NCv3: V100 16GB
    ("Standard_NC6s_v3", 6, 112, 1, "V100", 3.06, 0.4284), ("Standard_NC12s_v3", 12, 224, 2, "V100", 6.12, 0.8568),
    ("Standard_NC24s_v3", 24, 448, 4, "V100", 12.24, 1.7136), ("Standard_NC24rs_v3", 24, 448, 4, "V100", 13.46, 1.8844),
    # NC A100 v4: A100 80GB PCIe
    ("Standard_NC24ads_A100_v4", 24, 220, 1, "A100-80GB", 3.673, 0.488876),
    ("Standard_NC48ads_A100_v4", 48, 440, 2, "A100-80GB", 7.346, 0.977753),
    ("Standard_NC96ads_A100_v4", 96, 880, 4, "A100-80GB", 14.692, 1.955505),
    # ND A100 v4 (8 x A100 40GB) and NDm A100 v4 (8 x A100 80GB)
    ("Standard_ND96asr_v4", 96, 900, 8, "A100", 27.197),
    ("Standard_ND96amsr_A100_v4", 96, 1900, 8, "A100-80GB", 32.77),
    # NCads H100 v5 and ND H100 v5
    ("Standard_NC40ads_H100_v5", 40, 320, 1, "H100", 6.98),
    ("Standard_NC80adis_H100_v5", 80, 640, 2, "H100", 13.96),
    ("Standard_ND96isr_H100_v5", 96, 1900, 8, "H100", 98.32),
    # NVadsA10 v5: A10, the smaller sizes a fraction of one
    ("Standard_NV6ads_A10_v5", 6, 55, Fraction(1, 6), "A10", 0.454),
    ("Standard_NV12ads_A10_v5", 12, 110, Fraction(1, 3), "A10", 0.908),
    ("Standard_NV18ads_A10_v5", 18, 220, Fraction(1, 2), "A10", 1.6),
    ("Standard_NV36ads_A10_v5", 36, 440, 1, "A10", 3.2),
    ("Standard_NV36adms_A10_v5", 36, 880, 1, "A10", 4.52),
    ("Standard_NV72ads_A10_v5", 72, 880, 2, "A10", 6.52),
]
CATALOGUE = Catalogue("Azure ML", "VM size", "instance_type", tuple(
    Machine(*row[:6], spot_price=row[6] if len(row) > 6 else None) for row in _ROWS))
VM_SIZES: dict[str, Machine] = {m.name.lower(): m for m in CATALOGUE.machines}
choose_vm_size, fits = CATALOGUE.choose, CATALOGUE.fits


def family(name: str) -> str:
    """``Standard_NC24ads_A100_v4`` -> ``NCads_A100_v4`` (letters of the size, and what follows)."""
    found = re.match(r"(?i)^standard_([a-z]+)\d+([a-z]*)((?:_[a-z0-9]+)*)$", name)
    return f"{found.group(1)}{found.group(2)}{found.group(3)}" if found else name


def check_vm_name(value: str, field: str = "instance_type") -> str:
    """Parse time: the shape of a VM size name (``Standard_<family><vCPUs>...``)."""
    if not VM_SIZE_NAME.match(value):
        raise ValueError(f"{field}: {value!r} is not an Azure VM size (e.g. Standard_D4s_v3, Standard_NC6s_v3, "
                         "Standard_NC24ads_A100_v4)")
    return value


def lookup(value: str, field: str = "instance_type") -> Machine:
    """The table's VM size (case-insensitive), or an error naming the known sizes of its family."""
    check_vm_name(value, field)
    found = VM_SIZES.get(value.lower())
    if found is not None:
        return found
    families = {m.name: family(m.name) for m in CATALOGUE.machines}
    series = re.match(r"(?i)^standard_([a-z]+)", value)
    letters = series.group(1).lower() if series else ""
    same = [n for n, f in families.items() if f.lower() == family(value).lower()] or \
        [n for n, f in families.items() if letters and f.lower().startswith(letters)]
    hint = f"; sizes of that family: {', '.join(same)}" if same else \
        f"; known families: {', '.join(sorted(set(families.values())))}"
    raise ValueError(f"{field}: unknown Azure ML VM size {value!r}{hint}")
