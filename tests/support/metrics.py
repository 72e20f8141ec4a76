"""Reading the Prometheus expositions of the gateway and of llama-server."""

from __future__ import annotations

import os
import shutil
import subprocess

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families


def promtool_check(text: str) -> None:
    """Run `promtool check metrics` on an exposition and fail on any problem it reports.

    Without promtool the test is skipped, except in CI (env CI set), where it fails:
    there the check must really run."""
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (Debian package `prometheus`), and CI is set")
        pytest.skip("promtool is not installed (Debian package `prometheus`)")
    proc = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                          capture_output=True, timeout=60, check=False)
    output = (proc.stdout + proc.stderr).decode(errors="replace")
    problems = [line for line in output.splitlines() if line.strip()]
    assert proc.returncode in (0, 3), f"promtool could not parse the exposition:\n{output}"
    assert not problems, "promtool check metrics:\n" + "\n".join(problems)


class Samples(dict[tuple[str, frozenset[tuple[str, str]]], float]):
    """Samples of a text exposition, by name and labels."""

    @classmethod
    def parse(cls, text: str) -> Samples:
        samples = cls()
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                samples[(s.name, frozenset(s.labels.items()))] = s.value
        return samples

    def get_value(self, name: str, **labels: str) -> float | None:
        return self.get((name, frozenset(labels.items())))

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples named `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.items() if n == name and want <= ls)


async def scrape(http: aiohttp.ClientSession, url: str) -> tuple[str, Samples]:
    async with http.get(url + "/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    return text, Samples.parse(text)
