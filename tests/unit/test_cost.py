"""What a step costs: the billing math of ``prices.Price``, the flavors' price rules (machine tables, resource
rates, Modal's per-second rates), the charge of an attempt, ``max_cost`` and the connection's ``prices`` as bad
inputs, and tests/dags/cost_steps.py run by ``dag.test()``."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest

from airflow_stepops import cost
from airflow_stepops.bundle import StepIdentity
from airflow_stepops.exceptions import StepCostLimitError, StepOperatorConfigError
from airflow_stepops.machines import Machine
from airflow_stepops.prices import Price, Prices, PriceTable, machine_price, resource_price
from airflow_stepops.settings import modal_prices

from ..flavorjobs import declare

IDENTITY = StepIdentity("cost_unit", "run-1", "t", -1, 1)


# Price: billed time and the run time a budget buys ------------------------------------------------------------

@pytest.mark.parametrize(("increment", "minimum", "seconds", "billed"), [
    (1, 0, 0, 0), (1, 0, -3, 0), (1, 0, 0.2, 1), (1, 0, 2.0, 2), (1, 0, 2.0000000001, 2), (1, 0, 2.01, 3),
    (30, 0, 1, 30), (30, 0, 30, 30), (30, 0, 31, 60),
    (1, 60, 0.5, 60), (1, 60, 59.9, 60), (1, 60, 61.2, 62),  # Azure: per second, at least a minute
    (30, 60, 1, 60), (30, 60, 61, 90), (30, 60, 90, 90), (30, 60, 91, 120)])
def test_billed_seconds_round_up_to_the_increment_and_the_minimum(increment, minimum, seconds, billed):
    price = Price(3.6, increment_seconds=increment, minimum_seconds=minimum)
    assert price.billed_seconds(seconds) == billed


@pytest.mark.parametrize(("increment", "minimum", "budget", "seconds"), [
    (1, 0, 0.01, 10), (1, 0, 0.0105, 10), (1, 0, 0.0009, 0),  # 0.001 per second: not even one second
    (30, 0, 0.1, 90), (30, 0, 0.029, 0), (30, 0, 0.03, 30),
    (1, 60, 0.05, 0), (1, 60, 0.06, 60), (1, 60, 0.0615, 61),  # the minute's charge must fit
    (30, 60, 0.089, 60), (30, 60, 0.05, 0)])
def test_seconds_within_is_the_longest_billed_run_time_the_budget_pays_for(increment, minimum, budget, seconds):
    price = Price(3.6, increment_seconds=increment, minimum_seconds=minimum)  # 0.001 a second
    found = price.seconds_within(budget)
    assert found == seconds
    if found:  # what it allows costs at most the budget, a step more would not
        assert price.cost(price.billed_seconds(found)) <= budget + 1e-12
        assert price.cost(price.billed_seconds(found + increment)) > budget


@pytest.mark.parametrize("per_hour", [0.05, 0.7, 3.96, 13.46, 98.32])
@pytest.mark.parametrize("budget", [0.001, 0.0037, 0.25, 1.0, 17.3])
@pytest.mark.parametrize(("increment", "minimum"), [(1, 0), (1, 60), (30, 60)])
def test_a_run_time_within_the_budget_never_costs_more_than_it(per_hour, budget, increment, minimum):
    price = Price(per_hour, increment_seconds=increment, minimum_seconds=minimum)
    seconds = price.seconds_within(budget)
    assert seconds >= 0
    if seconds:
        assert price.cost(price.billed_seconds(seconds)) <= budget + 1e-9, (seconds, price.cost(seconds))
    else:  # nothing fits: even the least billed time costs more
        assert price.per_hour * max(minimum, increment, 1) / 3600 > budget


def test_an_unknown_price_allows_no_run_time_and_has_no_cost():
    unknown = Price.missing("no table", basis="x")
    assert unknown.seconds_within(100) == 0 and unknown.cost(60) is None
    assert unknown.to_json() == {"rate_per_hour": "unknown", "basis": "x", "why": "no table"}
    free = Price(0.0)
    assert free.seconds_within(0.01) > 10**9 and free.cost(3600) == 0


def test_cost_is_the_hourly_rate_times_billed_seconds():
    price = Price(3.96, increment_seconds=1, minimum_seconds=60)
    assert price.cost(90) == round(3.96 * 90 / 3600, 6) == 0.099
    assert price.to_json()["billing"] == "per 1 s, at least 60 s"


# machine_price: a flavor's table, the connection's prices ---------------------------------------------------

TABLE = PriceTable("eastus", "2026-12", "https://example.test/pricing", increment_seconds=1, minimum_seconds=60)
LARGE = Machine("m.large", 2, 8, price=1.0, spot_price=0.3)
NO_SPOT = Machine("m.old", 2, 8, price=0.8)


def test_machine_price_from_the_table_on_demand_and_spot():
    on_demand = machine_price(TABLE, LARGE, "m.large", spot=False)
    assert (on_demand.per_hour, on_demand.currency, on_demand.minimum_seconds) == (1.0, "USD", 60)
    assert on_demand.basis == "m.large, on-demand" and "eastus" in on_demand.source
    spot = machine_price(TABLE, LARGE, "m.large", spot=True, count=4)
    assert spot.per_hour == pytest.approx(1.2) and spot.basis == "m.large x 4, spot"


def test_a_discount_applies_to_the_tables_prices_not_to_the_connections_own():
    discounted = machine_price(TABLE, LARGE, "m.large", spot=False, prices=Prices(discount=0.25))
    assert discounted.per_hour == pytest.approx(0.75) and "less 25%" in discounted.source
    own = Prices(discount=0.25, machines={"m.large": {"on_demand": 2.0, "spot": 0.5}})
    assert machine_price(TABLE, LARGE, "m.large", spot=False, prices=own).per_hour == 2.0
    assert machine_price(TABLE, LARGE, "m.large", spot=True, prices=own, count=2).per_hour == 1.0
    assert machine_price(TABLE, LARGE, "m.large", spot=True, prices=own).source == "connection prices"


def test_another_currency_prices_only_the_machines_it_names():
    euros = Prices(currency="EUR", machines={"m.large": {"on_demand": 0.9}})
    assert machine_price(TABLE, LARGE, "m.large", spot=False, prices=euros).currency == "EUR"
    other = machine_price(TABLE, NO_SPOT, "m.old", spot=False, prices=euros)
    assert other.per_hour is None and "EUR" in other.unknown and "m.old" in other.unknown, other


def test_a_machine_the_table_does_not_have_is_unknown_and_named():
    found = machine_price(TABLE, None, "m.huge", spot=False)
    assert found.per_hour is None and "m.huge is not in the price table" in found.unknown
    assert found.basis == "m.huge, on-demand"
    # the connection can name it
    assert machine_price(TABLE, None, "m.huge", spot=False,
                         prices=Prices(machines={"m.huge": {"on_demand": 7}})).per_hour == 7


def test_spot_without_a_spot_price_is_unknown():
    found = machine_price(TABLE, NO_SPOT, "m.old", spot=True)
    assert found.per_hour is None and "no spot price for m.old" in found.unknown
    named = machine_price(TABLE, NO_SPOT, "m.old", spot=True, prices=Prices(machines={"m.old": {"on_demand": 1}}))
    assert named.per_hour is None and "no spot price" in named.unknown


def test_sagemaker_spot_is_billed_at_the_on_demand_rate():
    found = machine_price(TABLE, NO_SPOT, "m.old", spot=True, spot_billing=" (BillableTimeInSeconds)")
    assert found.per_hour == 0.8 and found.basis.endswith("(BillableTimeInSeconds)")


def test_the_flavors_tables():
    from airflow_stepops.settings import azureml_vms, sagemaker_instances, vertex_machines

    assert (azureml_vms.PRICES.increment_seconds, azureml_vms.PRICES.minimum_seconds) == (1, 60)
    d48 = azureml_vms.VM_SIZES["standard_d48s_v3"]
    assert machine_price(azureml_vms.PRICES, d48, d48.name, spot=True).per_hour is None  # no spot price listed
    d2 = azureml_vms.VM_SIZES["standard_d2s_v3"]
    assert machine_price(azureml_vms.PRICES, d2, d2.name, spot=True).per_hour == d2.spot_price < d2.price
    for table in (sagemaker_instances, vertex_machines):
        assert all(m.spot_price is None and m.price > 0 for m in table.CATALOGUE.machines)


# resource_price: Kubernetes and local ------------------------------------------------------------------------

RATES = Prices(on_demand={"hour": 0.1, "cpu_hour": 0.04, "memory_gib_hour": 0.005, "gpu_hour": {"A100": 2.9}},
               spot={"cpu_hour": 0.01, "memory_gib_hour": 0.001, "gpu_hour": {"*": 1.0}})


def test_resource_price_adds_cpus_memory_and_gpus():
    found = resource_price(RATES, spot=False, cpus=2, memory_gib=8, gpus=2, gpu_type="A100")
    assert found.per_hour == pytest.approx(0.1 + 2 * 0.04 + 8 * 0.005 + 2 * 2.9)
    assert found.basis == "2 CPU, 8 GiB, 2 x A100, on-demand"
    spot = resource_price(RATES, spot=True, cpus=2, memory_gib=8, gpus=1, gpu_type="T4")  # "*" prices any type
    assert spot.per_hour == pytest.approx(2 * 0.01 + 8 * 0.001 + 1.0)
    euros = resource_price(Prices(currency="EUR", on_demand={"cpu_hour": 1}), spot=False, cpus=3, memory_gib=None)
    assert (euros.per_hour, euros.currency) == (3, "EUR")


def test_resource_price_without_rates_is_unknown_and_says_what_to_set():
    assert "prices.on_demand" in resource_price(None, spot=False, cpus=1, memory_gib=1).unknown
    assert "prices.spot" in resource_price(Prices(), spot=True, cpus=1, memory_gib=1).unknown
    no_cpus = resource_price(RATES, spot=False, cpus=None, memory_gib=8)
    assert no_cpus.per_hour is None and "resources.cpu_count" in no_cpus.unknown
    no_memory = resource_price(RATES, spot=False, cpus=2, memory_gib=None)
    assert no_memory.per_hour is None and "resources.memory" in no_memory.unknown
    no_gpu = resource_price(RATES, spot=False, cpus=2, memory_gib=8, gpus=1, gpu_type="H100")
    assert no_gpu.per_hour is None and "H100" in no_gpu.unknown


# Modal: per second of what the function reserves -------------------------------------------------------------

def _host(cpu, memory_mib):
    return (cpu * modal_prices.CPU_CORE_SECOND + memory_mib / 1024 * modal_prices.MEMORY_GIB_SECOND) * 3600


def test_modal_price_of_the_default_reservation_and_of_cpus_and_memory():
    assert modal_prices.function_price({}, None).per_hour == pytest.approx(_host(0.125, 128))
    found = modal_prices.function_price({"cpu": 2, "memory": 4096}, None)
    assert found.per_hour == pytest.approx(_host(2, 4096)) and found.currency == "USD"


def test_modal_gpu_list_is_priced_as_its_dearest_gpu():
    found = modal_prices.function_price({"cpu": 1, "memory": 1024, "gpu": ["T4", "A100-80GB:2", "L4"]}, None)
    assert found.per_hour == pytest.approx(_host(1, 1024) + 2 * modal_prices.GPU_SECOND["A100-80GB"] * 3600)
    assert "dearest of T4/A100-80GB/L4" in found.basis
    assert modal_prices.function_price({"gpu": "H100:2"}, None).per_hour == pytest.approx(
        _host(0.125, 128) + 2 * modal_prices.GPU_SECOND["H100"] * 3600)


def test_modal_nonpreemptible_triples_cpu_and_memory_not_gpus():
    options = {"cpu": 4, "memory": 8192, "gpu": "A10"}
    preemptible = modal_prices.function_price(options, None).per_hour
    nonpreemptible = modal_prices.function_price({**options, "nonpreemptible": True}, None).per_hour
    assert nonpreemptible - preemptible == pytest.approx(2 * _host(4, 8192))


@pytest.mark.parametrize(("region", "factor"), [(None, 1.0), ("us", 1.5), (["eu", "us"], 1.5), ("us-east", 1.75),
                                                (["us", "us-east-1"], 1.75)])
def test_modal_region_multiplies_the_whole_price(region, factor):
    options = {"cpu": 2, "memory": 2048, "gpu": "L40S", "nonpreemptible": True}
    base = modal_prices.function_price(options, None).per_hour
    assert modal_prices.function_price({**options, "region": region}, None).per_hour == pytest.approx(base * factor)


def test_modal_connection_prices():
    rates = Prices(currency="EUR", on_demand={"cpu_hour": 0.05, "memory_gib_hour": 0.01, "gpu_hour": {"T4": 0.6}})
    found = modal_prices.function_price({"cpu": 2, "memory": 2048, "gpu": "T4", "nonpreemptible": True}, rates)
    assert (found.per_hour, found.currency) == (pytest.approx(2 * 0.05 + 2 * 0.01 + 0.6), "EUR")
    no_gpu_rate = modal_prices.function_price({"cpu": 2, "memory": 2048, "gpu": "H100", "nonpreemptible": True},
                                              rates)
    assert no_gpu_rate.per_hour is None and "gpu_hour" in no_gpu_rate.unknown
    assert modal_prices.function_price({}, Prices(currency="EUR")).per_hour is None  # no table in euros
    discounted = modal_prices.function_price({"cpu": 2}, Prices(discount=0.5)).per_hour
    assert discounted == pytest.approx(modal_prices.function_price({"cpu": 2}, None).per_hour / 2)


# cost.charge and cost.total ----------------------------------------------------------------------------------

def _handle(price: Price | None) -> dict:
    from dataclasses import asdict

    return {"job_id": "j", "cost": {"price": asdict(price) if price else None}}


def test_a_charge_uses_the_services_billable_seconds_where_it_reports_them():
    handle = _handle(Price(3.6, basis="ml.m5.large, spot"))  # 0.001 a second
    charged = cost.charge(handle, {"started_at": 100.0, "finished_at": 200.0, "billable_seconds": 42})
    assert charged == {"amount": 0.042, "currency": "USD", "billed_seconds": 42, "rate_per_hour": 3.6,
                       "basis": "ml.m5.large, spot"}


def test_a_charge_rounds_the_run_time_as_the_service_bills_it():
    per_second = _handle(Price(3.6, increment_seconds=1))
    assert cost.charge(per_second, {"started_at": 100.0, "finished_at": 110.2})["billed_seconds"] == 11
    azure = _handle(Price(3.6, increment_seconds=1, minimum_seconds=60))
    charged = cost.charge(azure, {"started_at": 100.0, "finished_at": 110.2})
    assert (charged["billed_seconds"], charged["amount"]) == (60, 0.06)
    running = cost.charge(per_second, {"started_at": 100.0}, ended=105.5)  # not finished: until ``ended``
    assert running["billed_seconds"] == 6


def test_a_job_that_never_started_costs_nothing_and_one_without_a_price_has_no_charge():
    charged = cost.charge(_handle(Price(3.6, minimum_seconds=60)), {"finished_at": 110.0})
    assert (charged["billed_seconds"], charged["amount"]) == (0, 0.0)
    assert cost.charge(_handle(None), {"started_at": 1.0, "finished_at": 2.0}) is None
    unknown = cost.charge(_handle(Price.missing("no table")), {"started_at": 1.0, "finished_at": 2.0})
    assert unknown["amount"] is None


def test_total_of_attempts():
    usd = {"job_id": "j1", "amount": 0.5, "currency": "USD", "billed_seconds": 10}
    assert cost.total([usd, {**usd, "job_id": "j2", "amount": 0.25}]) == {
        "amount": 0.75, "currency": "USD", "billed_seconds": 20}
    unknown = cost.total([usd, {**usd, "job_id": "j2", "amount": None, "why": "not in the table"}])
    assert unknown == {"amount": "unknown", "why": "not in the table"}
    mixed = cost.total([usd, {**usd, "job_id": "j2", "currency": "EUR", "amount": 0.1}, {**usd, "job_id": "j3"}])
    assert mixed == {"amount": "mixed", "by_currency": {"EUR": 0.1, "USD": 1.0}}
    assert cost.total([]) == {"amount": 0, "currency": "USD", "billed_seconds": 0}
    # a step operator that refused the job at create (no job) neither costs nor makes the total unknown
    assert cost.total([{"job_id": None, "amount": None}, usd])["amount"] == 0.5
    assert cost.spent([usd, {**usd, "amount": None}, {}]) == 0.5


# max_cost and failover_order: bad inputs ---------------------------------------------------------------------

BAD_MAX_COSTS = [-1, 0, "abc", "5", True, math.nan, math.inf]


def _operator(**kwargs):
    from airflow_stepops.operators.base import StepOperator
    from tests.steps import sleep_then_return

    return StepOperator(task_id="cost_checks", python_callable=sleep_then_return, **kwargs)


@pytest.mark.parametrize("value", BAD_MAX_COSTS, ids=repr)
def test_a_bad_max_cost_argument_is_refused_naming_it(value):
    with pytest.raises(StepOperatorConfigError, match="max_cost"):
        _operator(step_operator="local_step_operator", max_cost=value)


@pytest.mark.parametrize("value", BAD_MAX_COSTS, ids=repr)
@pytest.mark.parametrize("flavor", ["sagemaker", "kubernetes"])
def test_a_bad_max_cost_setting_is_refused_when_the_dag_is_parsed(flavor, value):
    with pytest.raises(StepOperatorConfigError, match="max_cost"):
        declare(flavor, settings={f"step_operator.{flavor}": {"max_cost": value}})
    with pytest.raises(StepOperatorConfigError, match="max_cost"):
        declare(flavor, max_cost=value)


def test_a_max_cost_argument_wins_over_the_flavor_setting():
    from airflow_stepops.hooks.local import LocalStepOperatorHook

    op = _operator(step_operator="local_step_operator", max_cost=2.5, settings={"step_operator.local": {
        "max_cost": 9}})
    assert op.policy(LocalStepOperatorHook(step_operator_conn_id="local_step_operator")).max_cost == 2.5


def test_an_unknown_failover_order_is_refused():
    with pytest.raises(StepOperatorConfigError, match=r"failover_order: 'bogus' is not one of 'given', 'cheapest'"):
        _operator(step_operator="local_step_operator", failover_order="bogus")


# the connection's prices -------------------------------------------------------------------------------------

def _priced_connection(monkeypatch, conn_id, prices):
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(
        {"conn_type": "stepops_local", "extra": {"prices": prices}}))
    return conn_id


@pytest.mark.parametrize(("prices", "says"), [
    ({"machnes": {"x": {"on_demand": 1}}}, "machnes"),
    ({"machines": {"x": {"on_demand": -1}}}, "on_demand"),
    ({"on_demand": {"cpu_hour": -0.1}}, "cpu_hour"),
    ({"on_demand": {"gpu_hour": {"A100": -2}}}, "gpu_hour"),
    ({"currency": "usd"}, "currency"),
    ({"discount": 1}, "discount"),
    ("prices.yaml", "not a JSON file"),
    (["not", "prices"], "prices")], ids=["unknown_field", "negative_machine", "negative_cpu", "negative_gpu",
                                         "lowercase_currency", "discount_one", "yaml_path", "a_list"])
def test_malformed_connection_prices_are_refused_when_the_connection_is_read(monkeypatch, prices, says):
    from airflow_stepops.connections import load_config

    conn_id = _priced_connection(monkeypatch, "bad_prices", prices)
    with pytest.raises(StepOperatorConfigError, match="prices") as raised:
        load_config(conn_id)
    assert says in str(raised.value) and "bad_prices" in str(raised.value), raised.value


def _local_spec(hook, **resources):
    from airflow_stepops.hooks.base import StepSpec
    from airflow_stepops.resources import ResourceSettings
    from airflow_stepops.settings.local import LocalStepOperatorSettings

    return StepSpec(identity=IDENTITY, bundle_uri="/nowhere/bundle", output_uri="/nowhere/output",
                    resources=ResourceSettings(**resources), settings=LocalStepOperatorSettings(), refs=[],
                    task_label="cost_unit.t")


def test_a_prices_file_is_read_when_a_step_is_priced(monkeypatch, tmp_path):
    from airflow_stepops.hooks.local import LocalStepOperatorHook

    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"currency": "EUR", "on_demand": {"cpu_hour": 0.5, "memory_gib_hour": 0.25}}))
    hook = LocalStepOperatorHook(step_operator_conn_id=_priced_connection(monkeypatch, "file_prices", str(path)))
    price = hook.price(_local_spec(hook, cpu_count=2, memory="4GiB"))
    assert (price.per_hour, price.currency) == (2 * 0.5 + 4 * 0.25, "EUR")


@pytest.mark.parametrize(("content", "says"), [
    (None, "cannot read the price file"), ("{not json", "cannot read the price file"),
    (json.dumps({"machines": {"x": {"on_demand": "cheap"}}}), "machines.x.on_demand")],
    ids=["missing", "not_json", "invalid"])
def test_a_prices_file_missing_or_malformed_is_refused_naming_it_when_a_step_is_priced(monkeypatch, tmp_path,
                                                                                        content, says):
    from airflow_stepops.hooks.local import LocalStepOperatorHook

    path = tmp_path / f"prices-{says.split()[0]}.json"
    if content is not None:
        path.write_text(content)
    hook = LocalStepOperatorHook(step_operator_conn_id=_priced_connection(monkeypatch, "file_prices", str(path)))
    spec = _local_spec(hook, cpu_count=1, memory="1GiB")
    with pytest.raises(StepOperatorConfigError, match="prices") as raised:
        hook.price(spec)
    assert says in str(raised.value) and "file_prices" in str(raised.value), raised.value
    assert path.name in str(raised.value), f"the error does not name the file: {raised.value}"


def test_an_unpriced_step_under_max_cost_is_refused_before_submitting(monkeypatch, tmp_path):
    """The local flavor has no price table: without the connection's prices, max_cost cannot be kept."""
    monkeypatch.setenv("AIRFLOW_CONN_UNPRICED_LOCAL", json.dumps(
        {"conn_type": "stepops_local", "extra": {"jobs_dir": str(tmp_path / "jobs")}}))
    op = _operator(step_operator="unpriced_local", max_cost=5, resources={"cpu_count": 1, "memory": "1GiB"})
    with pytest.raises(StepCostLimitError, match=r"max_cost=5: the price of the step on step operator "
                                                 r"'unpriced_local' is unknown .*prices\.on_demand"):
        op.check_step_operators(IDENTITY)
    assert not (tmp_path / "jobs").exists()


def test_a_priced_local_step_whose_resources_the_rates_need_is_refused(monkeypatch):
    op = _operator(step_operator="priced_local", max_cost=5)  # priced per CPU and GiB, reserving neither
    with pytest.raises(StepCostLimitError, match="resources.cpu_count"):
        op.check_step_operators(IDENTITY)


def _sagemaker_connection(monkeypatch, **extra):
    monkeypatch.setenv("AIRFLOW_CONN_COST_SAGEMAKER", json.dumps({"conn_type": "stepops_sagemaker", "extra": {
        "role": "arn:aws:iam::123456789012:role/stepops-tests", "region_name": "us-east-1",
        "image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/stepops-python:3",
        "artifact_store": "s3://stepops-cost-tests/artifacts", **extra}}))
    return "cost_sagemaker"


def test_an_instance_type_not_in_the_price_table_is_unknown_and_max_cost_refuses_it(monkeypatch):
    from airflow_stepops.settings.sagemaker import check_instance_type
    from airflow_stepops.settings.sagemaker_instances import INSTANCE_TYPES

    pytest.importorskip("botocore")
    assert "ml.trn1.2xlarge" not in INSTANCE_TYPES
    check_instance_type("ml.trn1.2xlarge", "instance_type", against_api=True)  # SageMaker has it
    conn_id = _sagemaker_connection(monkeypatch)
    settings = {"step_operator.sagemaker": {"instance_type": "ml.trn1.2xlarge"}}
    op = _operator(step_operator=conn_id, settings=settings)
    hook = op.get_hook(conn_id)
    price = op.build_spec(hook, IDENTITY, [], priced=True).price
    assert price.per_hour is None and "ml.trn1.2xlarge is not in the price table" in price.unknown
    with pytest.raises(StepCostLimitError, match=r"ml\.trn1\.2xlarge is not in the price table"):
        _operator(step_operator=conn_id, settings=settings, max_cost=100).check_step_operators(IDENTITY)
    # named in the connection's prices, it is known
    _sagemaker_connection(monkeypatch, prices={"machines": {"ml.trn1.2xlarge": {"on_demand": 1.5}}})
    priced = _operator(step_operator=conn_id, settings=settings, max_cost=100)
    spec = priced.build_spec(priced.get_hook(conn_id), IDENTITY, [])
    hook = priced.get_hook(conn_id)  # SageMaker bills up to 120 s to stop a job: max_cost keeps them back
    assert spec.price.per_hour == 1.5 and spec.cost_seconds == spec.price.seconds_within(100) - hook.stop_billing_seconds


def test_a_cluster_whose_size_is_not_in_the_table_is_unknown_and_max_cost_refuses_it(az_emulator, monkeypatch):
    from ..flavorjobs import connection_like

    az_emulator.add_compute("hpc-cluster", "Standard_HB120rs_v3")
    conn_id = connection_like(monkeypatch, "az_hpc_cluster", "azureml_cluster_step_operator",
                              compute_target_name="hpc-cluster")
    before = set(az_emulator.job_ids)
    op = _operator(step_operator=conn_id)
    price = op.build_spec(op.get_hook(conn_id), IDENTITY, [], priced=True).price
    assert price.per_hour is None and "Standard_HB120rs_v3 is not in the price table" in price.unknown
    with pytest.raises(StepCostLimitError, match="Standard_HB120rs_v3 is not in the price table"):
        _operator(step_operator=conn_id, max_cost=50).check_step_operators(IDENTITY)
    assert set(az_emulator.job_ids) == before


def test_cheapest_failover_order_sorts_by_price_and_puts_unknown_prices_last(monkeypatch):
    for conn_id, cpu_hour in (("dear_local", 9.0), ("cheap_local", 0.5)):
        _priced_connection(monkeypatch, conn_id, {"on_demand": {"cpu_hour": cpu_hour}})
    monkeypatch.setenv("AIRFLOW_CONN_FREE_BUT_UNPRICED", json.dumps({"conn_type": "stepops_local", "extra": {}}))
    op = _operator(step_operator=["free_but_unpriced", "dear_local", "cheap_local"], failover_order="cheapest",
                   resources={"cpu_count": 1})
    op.check_step_operators(IDENTITY)
    assert op.step_operators == ["cheap_local", "dear_local", "free_but_unpriced"]
    given = _operator(step_operator=["free_but_unpriced", "dear_local", "cheap_local"], resources={"cpu_count": 1})
    given.check_step_operators(IDENTITY)
    assert given.step_operators == ["free_but_unpriced", "dear_local", "cheap_local"]


# tests/dags/cost_steps.py through dag.test() ------------------------------------------------------------------

@pytest.mark.usefixtures("airflow_db")
def test_cost_steps_dag_pays_stops_and_refuses(capfd):
    from airflow_stepops.hooks.local import LocalStepOperatorHook
    from airflow_stepops.runtime.local_launcher import process_start_time
    from tests.dags import cost_steps

    from .test_operator import _run, _xcom

    hook = LocalStepOperatorHook(step_operator_conn_id="priced_local")
    started = time.time()
    _, tis = _run(cost_steps.cost_steps)
    states = {task_id: ti.state for task_id, ti in tis.items()}
    assert states == {"paid": "success", "stopped": "failed", "refused": "failed", "timed_out": "failed",
                      "retried": "failed"}, states
    rate = 1 * 3.6 + 1 * 0.36

    paid = _xcom(tis["paid"], key="stepops_job")
    charged = paid["cost"]
    assert charged["rate_per_hour"] == pytest.approx(rate) and charged["currency"] == "USD", paid
    assert charged["billed_seconds"] >= 2 and charged["amount"] > 0, paid  # it slept 1.5 s
    assert charged["amount"] == pytest.approx(rate * charged["billed_seconds"] / 3600, abs=1e-6)
    (only,) = paid["charges"]
    assert only["try"] == 1 and only["job_id"] == paid["job_id"] and only["amount"] == charged["amount"]

    stopped = _xcom(tis["stopped"], key="stepops_job")
    assert tis["stopped"].try_number == 1 and stopped["job_id"], stopped  # not retried
    assert 0 < stopped["cost"]["amount"] <= 0.004 and stopped["cost"]["billed_seconds"] <= 3, stopped
    assert stopped["cost"]["amount"] == pytest.approx(rate * stopped["cost"]["billed_seconds"] / 3600, abs=1e-6)
    assert all(c["try"] == 1 for c in stopped["charges"]), stopped
    job_dir = Path(hook.jobs_dir) / stopped["job_id"]
    assert job_dir.is_dir() and (job_dir / "status.json").exists(), job_dir
    child = json.loads((job_dir / "child.json").read_text())
    deadline = time.monotonic() + 15
    while process_start_time(child["pid"]) == child["start_time"]:
        assert time.monotonic() < deadline, "the stopped step still runs"
        time.sleep(0.1)

    jobs = Path(hook.jobs_dir)
    refused = [p.name for p in jobs.iterdir() if p.name.startswith("cost_steps-refused-")
               and p.stat().st_mtime >= started - 1]
    assert [p.name for p in jobs.iterdir() if p.name.startswith("cost_steps-paid-t1-")], "no job dir of paid"
    assert refused == [], refused
    timed = _xcom(tis["timed_out"], key="stepops_job")  # stopped by Airflow's timeout: its run is billed all the same
    assert timed["cost"]["billed_seconds"] >= 1 and timed["cost"]["amount"] > 0, timed
    retried = _xcom(tis["retried"], key="stepops_job")  # the summary of try 2 lists both tries' charges
    assert tis["retried"].try_number == 2 and [c["try"] for c in retried["charges"]] == [1, 2], retried
    first, second = retried["charges"]
    assert first["billed_seconds"] == 3 and second["billed_seconds"] < 3, retried  # try 2 got what try 1 left
    assert first["amount"] + second["amount"] <= 0.0066, retried
    out = capfd.readouterr()
    log = out.out + out.err  # the tasks' logs (the failure of each, with its exception)
    assert "StepCostLimitError" in log and "was stopped at max_cost=0.004" in log, log[-3000:]
    assert "max_cost=1e-06 does not pay for the least the step can be billed on step operator 'priced_local'" in log
