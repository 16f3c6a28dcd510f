"""Flow and capture runs: planning a run, driving the node runners, judging the outcome."""
