"""SageMaker training instance types: what each offers (the cheapest that fits is ``machines``' choice).

Prices are us-east-1 on-demand list prices per hour for SageMaker training, used for cost estimates as well as
to choose a type; where and when they were read is in ``PRICES``. There are no spot prices (``spot_price`` is
None for every row): managed spot training is billed at the on-demand rate for the job's BillableTimeInSeconds
(DescribeTrainingJob: multiply BillableTimeInSeconds by InstanceCount; the saving is 1 - BillableTimeInSeconds /
TrainingTimeInSeconds), so a spot step costs the on-demand price times its billable time. The table covers the
common training families; any other ``ml.*`` type SageMaker accepts can still be given as ``instance_type``.
"""

from __future__ import annotations

from airflow_stepops.machines import Catalogue, Machine
from airflow_stepops.prices import PriceTable

#: Billing: per second, no minimum. The pricing page (https://aws.amazon.com/sagemaker/pricing/) states on-demand
#: pricing has no minimum fees; per-second metering is as third-party breakdowns state it, not quoted from AWS here.
#: The date is when the table was written (2026-11); its rows were not re-read against the page since.
PRICES = PriceTable("us-east-1", "2026-11", "https://aws.amazon.com/sagemaker/pricing/", increment_seconds=1,
                    minimum_seconds=0)

_ROWS: list[tuple[str, int, float, int, str | None, float]] = [
    ("ml.t3.medium", 2, 4, 0, None, 0.05), ("ml.t3.large", 2, 8, 0, None, 0.10),
    ("ml.t3.xlarge", 4, 16, 0, None, 0.20), ("ml.t3.2xlarge", 8, 32, 0, None, 0.40),
    ("ml.m5.large", 2, 8, 0, None, 0.115), ("ml.m5.xlarge", 4, 16, 0, None, 0.23),
    ("ml.m5.2xlarge", 8, 32, 0, None, 0.461), ("ml.m5.4xlarge", 16, 64, 0, None, 0.922),
    ("ml.m5.12xlarge", 48, 192, 0, None, 2.765), ("ml.m5.24xlarge", 96, 384, 0, None, 5.53),
    ("ml.c5.xlarge", 4, 8, 0, None, 0.204), ("ml.c5.2xlarge", 8, 16, 0, None, 0.408),
    ("ml.c5.4xlarge", 16, 32, 0, None, 0.816), ("ml.c5.9xlarge", 36, 72, 0, None, 1.836),
    ("ml.c5.18xlarge", 72, 144, 0, None, 3.672),
    ("ml.r5.large", 2, 16, 0, None, 0.151), ("ml.r5.xlarge", 4, 32, 0, None, 0.302),
    ("ml.r5.2xlarge", 8, 64, 0, None, 0.605), ("ml.r5.4xlarge", 16, 128, 0, None, 1.21),
    ("ml.r5.12xlarge", 48, 384, 0, None, 3.629), ("ml.r5.24xlarge", 96, 768, 0, None, 7.258),
    ("ml.g4dn.xlarge", 4, 16, 1, "T4", 0.736), ("ml.g4dn.2xlarge", 8, 32, 1, "T4", 0.94),
    ("ml.g4dn.4xlarge", 16, 64, 1, "T4", 1.505), ("ml.g4dn.8xlarge", 32, 128, 1, "T4", 2.72),
    ("ml.g4dn.12xlarge", 48, 192, 4, "T4", 4.89), ("ml.g4dn.16xlarge", 64, 256, 1, "T4", 5.44),
    ("ml.g5.xlarge", 4, 16, 1, "A10G", 1.408), ("ml.g5.2xlarge", 8, 32, 1, "A10G", 1.515),
    ("ml.g5.4xlarge", 16, 64, 1, "A10G", 2.03), ("ml.g5.8xlarge", 32, 128, 1, "A10G", 3.06),
    ("ml.g5.12xlarge", 48, 192, 4, "A10G", 7.09), ("ml.g5.24xlarge", 96, 384, 4, "A10G", 10.18),
    ("ml.g5.48xlarge", 192, 768, 8, "A10G", 20.36),
    ("ml.g6.xlarge", 4, 16, 1, "L4", 1.006), ("ml.g6.2xlarge", 8, 32, 1, "L4", 1.222),
    ("ml.g6.4xlarge", 16, 64, 1, "L4", 1.654), ("ml.g6.12xlarge", 48, 192, 4, "L4", 5.752),
    ("ml.g6.48xlarge", 192, 768, 8, "L4", 16.6),
    ("ml.g6e.xlarge", 4, 32, 1, "L40S", 2.336), ("ml.g6e.12xlarge", 48, 384, 4, "L40S", 13.12),
    ("ml.g6e.48xlarge", 192, 1536, 8, "L40S", 37.66),
    ("ml.p3.2xlarge", 8, 61, 1, "V100", 3.825), ("ml.p3.8xlarge", 32, 244, 4, "V100", 14.688),
    ("ml.p3.16xlarge", 64, 488, 8, "V100", 28.152), ("ml.p3dn.24xlarge", 96, 768, 8, "V100", 35.894),
    ("ml.p4d.24xlarge", 96, 1152, 8, "A100", 37.688), ("ml.p4de.24xlarge", 96, 1152, 8, "A100-80GB", 47.11),
    ("ml.p5.48xlarge", 192, 2048, 8, "H100", 98.32), ("ml.p5e.48xlarge", 192, 2048, 8, "H200", 113.0),
]
CATALOGUE = Catalogue("SageMaker", "training instance type", "instance_type", tuple(
    Machine(*row, burstable=row[0].startswith("ml.t")) for row in _ROWS))  # T-family: CPU credits
INSTANCE_TYPES: dict[str, Machine] = {m.name: m for m in CATALOGUE.machines}
choose_instance, fits = CATALOGUE.choose, CATALOGUE.fits
