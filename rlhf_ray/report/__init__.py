"""The run report (`rlhf-ray report`: report.html and PNG plots, `report.build`) and the reward-hacking
monitors the RLHF loop and the report share (`report.monitors`). Importing this package loads nothing heavy:
matplotlib is imported when a plot is drawn."""
