"""The kubelet side: resource servers, registration, the socket and plugin watchers, request decoding and the
generated API.
"""
