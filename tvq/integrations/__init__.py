"""tvq inside other programs: plugins that run tvq models in-process (llm_plugin: `llm`)."""
