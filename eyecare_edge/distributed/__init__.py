"""Archive-scale screening: the same items and lines as `screening.run_screen`, run by a pool of
Ray Data actors and written to a directory of parts.

`inputs` (manifests, folders, file lists -> sources with stable ids) and `parts` (the results
directory, resume, dedupe) import no Ray; only `ray_engine` does, and only the `--engine ray`
path of `eyecare-edge screen` imports it (install the `ray` extra).
"""
