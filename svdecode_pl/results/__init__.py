"""Stage 10, results: ``results.json`` (payload, console table, mu curve) and the report
(tables and figures across runs). May import stages 0-9."""
