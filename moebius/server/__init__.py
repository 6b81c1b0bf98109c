"""HTTP service and web page for the pipeline (`moebius serve`; needs the `server` extra).

`moebius.server.app.create_app` builds the FastAPI app; `moebius.server.cli` is the subcommand.
Nothing heavy is imported here, so `moebius serve -h` stays fast.
"""
