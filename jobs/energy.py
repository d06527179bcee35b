"""Energy of a cell: codecarbon's offline estimate, accumulated across attempts.

codecarbon models CPU, GPU and RAM power from the hardware it detects (RAPL
and NVML where readable, a TDP table otherwise) and integrates over time. The
offline tracker never uses the network; the country code picks the carbon
intensity of the grid.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)

TOTAL_KEYS = ("energy_kwh_modelled", "cpu_kwh", "gpu_kwh", "ram_kwh", "emissions_kg", "duration_s")


class EnergyMeter:
    """Measure one attempt of a cell and add the totals carried from earlier attempts.

    Parameters
    ----------
    country
        ISO 3166 alpha-3 country code of the cluster's grid (for emissions).
    carried
        Totals of earlier attempts, as stored in the checkpoint (`snapshot()`).
    """

    def __init__(self, country: str = "USA", carried: dict[str, Any] | None = None) -> None:
        self.country = country
        self.carried = {key: float((carried or {}).get(key, 0.0)) for key in TOTAL_KEYS}
        self.tracker = None
        self.unavailable: dict[str, str] = {}

    def start(self) -> None:
        try:
            # Imported here: codecarbon is slow to import and only jobs need it.
            from codecarbon import OfflineEmissionsTracker

            self.tracker = OfflineEmissionsTracker(
                country_iso_code=self.country,
                save_to_file=False,
                log_level="error",
                allow_multiple_runs=True,  # several packed or array tasks may share a node
                tracking_mode="process",
                measure_power_secs=float(os.environ.get("QAT_ENERGY_INTERVAL_S", "15")),
            )
            self.tracker.start()
        except Exception as err:  # codecarbon failing must never stop training
            log.warning("codecarbon unavailable (%s); energy will not be modelled", err)
            self.unavailable["codecarbon"] = str(err)
            self.tracker = None

    def _attempt(self, final: bool) -> dict[str, float]:
        """Return this attempt's totals so far (final=True stops the tracker)."""
        zero = {key: 0.0 for key in TOTAL_KEYS}
        if self.tracker is None:
            return zero
        try:
            if final:
                self.tracker.stop()
                data = self.tracker.final_emissions_data
            else:
                self.tracker._measure_power_and_energy()
                data = self.tracker._prepare_emissions_data()
        except Exception as err:  # a failed reading loses this attempt's estimate only
            log.warning("codecarbon reading failed (%s)", err)
            self.unavailable["codecarbon"] = str(err)
            return zero
        if data is None:
            return zero
        return {
            "energy_kwh_modelled": float(data.energy_consumed),
            "cpu_kwh": float(data.cpu_energy),
            "gpu_kwh": float(data.gpu_energy),
            "ram_kwh": float(data.ram_energy),
            "emissions_kg": float(data.emissions),
            "duration_s": float(data.duration),
        }

    def snapshot(self) -> dict[str, float]:
        """Return carried plus current totals, for a checkpoint."""
        attempt = self._attempt(final=False)
        return {key: self.carried[key] + attempt[key] for key in TOTAL_KEYS}

    def stop(self) -> dict[str, Any]:
        """Stop the tracker and return the attributes stored in the result file."""
        attempt = self._attempt(final=True)
        totals = {key: self.carried[key] + attempt[key] for key in TOTAL_KEYS}
        modelled = totals["energy_kwh_modelled"] if "codecarbon" not in self.unavailable else float("nan")
        return {
            **totals,
            "energy_kwh_modelled": modelled,
            "energy_kwh": modelled,
            "energy_source": "codecarbon" if modelled == modelled else "none",
            "country_iso_code": self.country,
            "unavailable": "; ".join(f"{k}: {v}" for k, v in self.unavailable.items()),
        }
