"""pytest-benchmark setup for ``pytest bench/``: options, sizes, and the shared measuring step.

Options (each has an environment variable, for scripts):

* ``--quick`` (``DLSN_BENCH_QUICK=1``): every case once, at small sizes; proves the benchmarks run.
* ``--device cpu|cuda`` (``DLSN_BENCH_DEVICE``): where tensors live.
* ``--kernel-backends cpu,triton`` (``DLSN_BENCH_BACKENDS``): our backends to time
  (default: ``cpu`` on the CPU, ``triton,cuda`` on CUDA). ``reference`` always runs as a baseline.
* ``--mem-limit-gb X`` (``DLSN_BENCH_MEM_LIMIT_GB``): materialising baselines estimated above this
  are skipped (default: half the available memory, at most 8 GB).
* ``--bench-rounds N`` (``DLSN_BENCH_ROUNDS``, default 5): timed rounds after one warm-up.
* ``--dtype float16`` (``DLSN_BENCH_DTYPE``, default float32): dtype of the attention core groups.
* ``--no-memory`` (``DLSN_BENCH_MEMORY=0``): skip the child-process peak-memory measurement.
* ``--bench-results DIR`` (``DLSN_BENCH_RESULTS``, default ``bench/results/latest``): where a full
  run writes ``<device>.json``, ``<device>.md`` and ``<device>_scaling.png``. Quick runs write nothing.

The run ends with one summary (``bench.report.render_summary``): every fused case against the
NLSN-style baseline of the same case, in place of pytest-benchmark's wide per-group tables (the
JSON keeps every statistic; ``--benchmark-verbose`` brings the tables back).

Torch uses every core the process may run on (``DLSN_BENCH_THREADS`` overrides); the header
line and the JSON's ``machine_info["dlsn_bench"]`` say how many.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import report
from bench.harness import GB, BenchConfig
from bench.memory import cpu_threads

DEFAULT_RESULTS = Path(__file__).resolve().parent / "results" / "latest"


def _env_flag(name: str) -> bool | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    return value.strip().lower() not in ("0", "false", "no", "off")


def _available_memory_bytes() -> float:
    """Memory available now: Linux's MemAvailable, else free pages (sysconf), else half the RAM, else 16 GB."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024.0
    except OSError:
        pass
    for pages, share in (("SC_AVPHYS_PAGES", 1.0), ("SC_PHYS_PAGES", 0.5)):
        try:
            return share * os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            continue
    return 16 * GB


# The largest baselines (512x512: NLSN-style and reference ~7.8 GB, DLSN-style ~9.4 GB estimated) run in this
# process next to ~1.7 GB of torch, kernels and data: half of what is available leaves room for both.
DEFAULT_MEM_SHARE = 0.5
DEFAULT_MEM_CAP_GB = 8.0


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dlsn-bench", "DLSN benchmarks (bench/)")
    group.addoption(
        "--quick",
        action="store_true",
        default=None,
        help="run every case once at small sizes (env DLSN_BENCH_QUICK=1)",
    )
    group.addoption("--device", default=None, help="cpu or cuda (env DLSN_BENCH_DEVICE; default cpu)")
    group.addoption(
        "--kernel-backends",
        default=None,
        help="comma-separated dlsn_kernels backends to time (env DLSN_BENCH_BACKENDS)",
    )
    group.addoption(
        "--mem-limit-gb",
        type=float,
        default=None,
        help="skip materialising baselines estimated above this (env DLSN_BENCH_MEM_LIMIT_GB)",
    )
    group.addoption(
        "--bench-rounds",
        type=int,
        default=None,
        help="timed rounds per case after one warm-up (env DLSN_BENCH_ROUNDS; default 5)",
    )
    group.addoption(
        "--dtype",
        default=None,
        help="dtype of the attention core's tensors, default float32 (env DLSN_BENCH_DTYPE)",
    )
    group.addoption(
        "--no-memory",
        action="store_true",
        default=None,
        help="do not measure peak memory in a child process (env DLSN_BENCH_MEMORY=0)",
    )
    group.addoption(
        "--bench-results",
        default=None,
        help="folder for a full run's JSON, Markdown report and scaling plot "
        "(env DLSN_BENCH_RESULTS; default bench/results/latest)",
    )


def _make_config(config: pytest.Config) -> BenchConfig:
    quick = bool(config.getoption("--quick") or _env_flag("DLSN_BENCH_QUICK"))
    device = (config.getoption("--device") or os.environ.get("DLSN_BENCH_DEVICE") or "cpu").strip()
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {device}: no CUDA device is visible to torch")
    default_backends = "triton,cuda" if torch.device(device).type == "cuda" else "cpu"
    backends_text = config.getoption("--kernel-backends") or os.environ.get("DLSN_BENCH_BACKENDS") or default_backends
    backends = tuple(b.strip() for b in backends_text.split(",") if b.strip() and b.strip() != "reference")
    limit_gb = config.getoption("--mem-limit-gb") or os.environ.get("DLSN_BENCH_MEM_LIMIT_GB")
    if limit_gb is not None:
        mem_limit = float(limit_gb) * GB
    elif torch.device(device).type == "cuda":
        mem_limit = 0.8 * torch.cuda.get_device_properties(torch.device(device)).total_memory
    else:
        mem_limit = min(DEFAULT_MEM_CAP_GB * GB, DEFAULT_MEM_SHARE * _available_memory_bytes())
    rounds = config.getoption("--bench-rounds") or int(os.environ.get("DLSN_BENCH_ROUNDS", "5"))
    no_memory = config.getoption("--no-memory") or _env_flag("DLSN_BENCH_MEMORY") is False
    dtype = (config.getoption("--dtype") or os.environ.get("DLSN_BENCH_DTYPE") or "float32").strip()
    if dtype not in ("float32", "float64", "float16", "bfloat16"):
        raise pytest.UsageError(f"--dtype must be float32, float64, float16 or bfloat16, got {dtype!r}")
    return BenchConfig(quick, device, backends, mem_limit, max(rounds, 1), not no_memory, cpu_threads(), dtype)


_CONFIG_KEY = pytest.StashKey[BenchConfig]()


def pytest_configure(config: pytest.Config) -> None:
    bench_config = _make_config(config)
    config.stash[_CONFIG_KEY] = bench_config
    # Explicit, so runs are comparable: all cores, in this process and in memory children.
    torch.set_num_threads(bench_config.threads)


def pytest_report_header(config: pytest.Config) -> list[str]:
    c = config.stash[_CONFIG_KEY]
    return [
        f"dlsn bench: device={c.device}, torch {torch.__version__}, torch threads={torch.get_num_threads()} "
        f"(all {c.threads} usable cores), mode={'quick' if c.quick else 'full'}, "
        f"backends={','.join(c.backends) or '-'}, baseline memory limit={c.mem_limit_bytes / GB:.1f} GB, "
        f"rounds={1 if c.quick else c.rounds}, core dtype={c.dtype}, "
        f"peak memory={'on' if c.measure_memory else 'off'}"
    ]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    c = config.stash[_CONFIG_KEY]
    info = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "device": c.device,
        "dtype": c.dtype,
        "quick": c.quick,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    if torch.device(c.device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(torch.device(c.device))
    machine_info["dlsn_bench"] = info


# Skipped cases (memory limit, missing backend), written into the JSON for bench/report.py.
_SKIPPED: list[dict[str, str]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and report.when in ("setup", "call"):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        _SKIPPED.append({"test": report.nodeid.split("::")[-1], "reason": reason.removeprefix("Skipped: ")})


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: list, output_json: dict) -> None:
    output_json["dlsn_skipped"] = list(_SKIPPED)


def pytest_sessionstart(session: pytest.Session) -> None:
    session_bench = getattr(session.config, "_benchmarksession", None)
    if session_bench is not None and not session.config.getoption("benchmark_verbose", False):
        # Our summary replaces the per-group tables (about 250 columns); regressions are still checked.
        session_bench.quiet = True


def _results_json(config: pytest.Config) -> dict[str, Any] | None:
    """This run's results in pytest-benchmark's JSON layout (what --benchmark-json would write)."""
    session_bench = getattr(config, "_benchmarksession", None)
    if session_bench is None or not session_bench.benchmarks:
        return None
    machine_info = config.hook.pytest_benchmark_generate_machine_info(config=config)
    config.hook.pytest_benchmark_update_machine_info(config=config, machine_info=machine_info)
    data = config.hook.pytest_benchmark_generate_json(
        config=config,
        benchmarks=session_bench.benchmarks,
        include_data=False,
        machine_info=machine_info,
        commit_info={},
    )
    config.hook.pytest_benchmark_update_json(config=config, benchmarks=session_bench.benchmarks, output_json=data)
    return data if data["benchmarks"] else None


def _write_results(data: dict[str, Any], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    if folder == DEFAULT_RESULTS and not (folder / ".gitignore").exists():
        (folder / ".gitignore").write_text("# results of the latest local run, not committed\n*\n")
    name = data["machine_info"]["dlsn_bench"]["device"].split(":")[0]
    json_path = folder / f"{name}.json"
    json_path.write_text(json.dumps(data, indent=1))
    return [json_path, *report.write_report(data, folder, name)]


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    data = _results_json(config)
    if data is None:
        return
    c = config.stash[_CONFIG_KEY]
    mode = "quick mode: tiny sizes, one round, not a measurement" if c.quick else "full run"
    terminalreporter.section(f"dlsn bench: fused vs NLSN-style on {c.device} ({mode})", sep="=")
    for line in report.render_summary(data):
        terminalreporter.write_line(line)
    if c.quick:
        terminalreporter.write_line("quick mode writes no report; a full run writes one to bench/results/latest/")
        return
    folder = Path(config.getoption("--bench-results") or os.environ.get("DLSN_BENCH_RESULTS") or DEFAULT_RESULTS)
    written = _write_results(data, folder)
    terminalreporter.write_line("wrote " + ", ".join(str(p) for p in written))


@pytest.fixture(scope="session")
def bench_config(request: pytest.FixtureRequest) -> BenchConfig:
    return request.config.stash[_CONFIG_KEY]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "impl" in metafunc.fixturenames:
        metafunc.parametrize("impl", metafunc.config.stash[_CONFIG_KEY].impls())
    if "model_preset" in metafunc.fixturenames and "model_backend" in metafunc.fixturenames:
        config = metafunc.config.stash[_CONFIG_KEY]
        pairs = []
        for index, preset in enumerate(metafunc.module.MODEL_PRESETS):
            for backend in [*config.backends, "reference"]:
                # Quick mode: the slow reference path runs on the first (smallest) preset only; the summary
                # says so where that row's baseline is missing.
                if config.quick and backend == "reference" and index > 0:
                    module = metafunc.module
                    _SKIPPED.append({"test": f"{metafunc.function.__name__}[{preset}-reference]",
                                     "group": module.MODEL_GROUP, "impl": "reference",
                                     "case": module.model_label(preset, module.MODEL_SIZE_QUICK),
                                     "reason": module.QUICK_REFERENCE_NOTE})
                    continue
                pairs.append((preset, backend))
        metafunc.parametrize(("model_preset", "model_backend"), pairs, ids=[f"{p}-{b}" for p, b in pairs])
    if "network_case" in metafunc.fixturenames:
        # Whole-network cases and impls (bench/network.py), quick or full.
        from bench.network import network_cases, network_impls

        config = metafunc.config.stash[_CONFIG_KEY]
        # each case with its own baseline (dlsn-style or nlsn-style), so pairs rather than a cross product
        net_pairs = [(c, impl) for c in network_cases(config.quick) for impl in network_impls(config.backends,
                                                                                            c.preset)]
        metafunc.parametrize(("network_case", "network_impl"), net_pairs,
                             ids=[f"{c.id}-{impl}" for c, impl in net_pairs])
    if "scaling_side" in metafunc.fixturenames:
        # Sizes come from the test module, so each file keeps its shapes next to its tests.
        module = metafunc.module
        quick = metafunc.config.stash[_CONFIG_KEY].quick
        sides = module.SCALING_SIDES_QUICK if quick else module.SCALING_SIDES
        metafunc.parametrize("scaling_side", sides, ids=[f"{s}x{s}" for s in sides])
