"""The model every layer speaks: devices and trees, backend protocols, request errors, supervised tasks,
bounds, and ownership of files and sockets.
"""
