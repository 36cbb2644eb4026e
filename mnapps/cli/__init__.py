"""Command-line tools: one module per tool, each with a ``main()`` (``tools/*.py`` and ``[project.scripts]`` call them)."""
