"""The EngineCore_k process and both ends of its wire: `EngineCore` (core.py), the process
loop and its I/O threads (core_proc.py, io_threads.py), the launcher's `CoreEngineProcManager`
(manager.py), the `DPCoordinator` and the API server's `EngineClient` (client.py)."""
