"""The run report (``python -m trm.report``): rows per experiment, the plan's verdict, PNG figures.

    python scripts/report.py runs/E0v2 runs/E1v2 runs/E_diag1 --out docs/report
"""

from trm.report import main

if __name__ == "__main__":
    main()
