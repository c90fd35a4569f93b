"""Stage 0, shared by every stage: user-error types and their one-line report, atomic file writes,
the allocator setting and the opt-in profiler. Imports nothing else of the package."""
