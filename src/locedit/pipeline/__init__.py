"""One thin entry point per DVC stage: read params, call the library, write outputs."""

#: stage name -> module with a ``run(params)`` function
STAGES: dict[str, str] = {
    "prepare": "locedit.pipeline.prepare",
    "filter": "locedit.pipeline.filter",
    "stats": "locedit.pipeline.stats",
    "trace": "locedit.pipeline.trace",
    "tune": "locedit.pipeline.tune",
    "edit": "locedit.pipeline.edit",
    "analyze": "locedit.pipeline.analyze",
}
