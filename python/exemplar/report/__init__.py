"""Showing answers: image and caption helpers (display.py), the HTML report
(html.py) and the plot grid (plot.py)."""
