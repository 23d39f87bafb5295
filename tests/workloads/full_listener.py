"""A TCP listener whose accept queue is full: listen(0) and one connection
of its own left waiting, so the kernel drops every SYN that arrives. Prints
its port; with an argument, waits for a line on standard input, then
accepts the waiting connection that many seconds later (the queue has
room again: the next retransmitted SYN is answered), then every later
one. Runs until killed."""
import socket
import sys
import time

s = socket.socket()
s.bind(("127.0.0.1", 0))
s.listen(0)
filler = socket.create_connection(s.getsockname())
print(s.getsockname()[1], flush=True)
if len(sys.argv) > 1:
    sys.stdin.readline()
    time.sleep(float(sys.argv[1]))
    held = []
    while True:
        held.append(s.accept())
time.sleep(600)
