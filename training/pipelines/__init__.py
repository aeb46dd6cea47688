"""Pipelines that drive several stages through the real command line or the library:
`cots demo` (data, train, eval, export, index, serve) and `cots ablate` (a ladder of runs).
Nothing is imported here: both register their subcommand without torch."""
