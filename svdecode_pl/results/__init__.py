"""Stage 7, results: ``results.json`` (payload, console table, mu curve) and ``svdecode report``
(tables and figures across runs). May import stages 0-6."""
