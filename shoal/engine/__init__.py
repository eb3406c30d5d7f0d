"""The EngineCore_k process and both ends of its wire: `EngineCore` (core.py), the process's
entry point and busy loop (core_proc.py) with its I/O threads (io_threads.py), the launcher's
`CoreEngineProcManager` (manager.py), the `DPCoordinator` (coordinator.py) and the API
server's `EngineClient` (client.py)."""
