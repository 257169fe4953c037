"""The Shiny dashboard's panels and helpers: the only part of hemorrhage_core that imports Shiny.

One module per panel (``*_panel.py``, each with a ``@module.ui`` and a ``@module.server``), assembled
by ``app.py`` at the repository root. ``config``, ``state``, ``tables``, ``predictors``, ``safety`` and
``pacs_source`` (the PACS side: studies, fetch, store, worklist) hold the Shiny-free logic the panels
share (tested without a browser); ``common`` the Shiny helpers; ``pacs_predict`` the Predict panel's
PACS source.
Importing this package imports nothing else, so ``hemorrhage_core`` stays usable without Shiny.
"""
