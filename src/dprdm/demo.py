"""`make demo`: the end-to-end offline demo (python -m dprdm.demo).

Prepares the emoji demo domains under .dprdm-demo/ (npm packages only), then shows the privacy
calculator on the reference setting. The generation part is added as the public-side pipeline
lands.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from dprdm.privacy import accounting

DEMO_ROOT = Path(".dprdm-demo")
console = Console()


def main() -> None:
    from dprdm.data.emoji import prepare_demo_data

    console.rule("[bold]dprdm demo")
    manifest = prepare_demo_data(DEMO_ROOT)
    console.print(f"demo data in {DEMO_ROOT.resolve()} ({'reused' if manifest.get('reused') else 'prepared'})")

    params = accounting.MechanismParams(sigma=0.2, q=0.01, k=18)
    eps = accounting.epsilon_for(params, 1000, 1e-7)
    eps_rdp, order = accounting.epsilon_rdp([(params, 1000)], 1e-7)
    console.print(
        f"reference setting sigma=0.2 q=0.01 k=18, 1000 queries, delta=1e-7: "
        f"epsilon {eps:.4f} (PLD), {eps_rdp:.4f} (RDP, order {order:g})"
    )


if __name__ == "__main__":
    main()
