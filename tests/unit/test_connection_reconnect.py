"""engine.connection.Connection.reconnect_if_dead with several threads (backup --jobs N): when libvirtd
restarted, one thread reopens the connection and the others take that one, none closes it again.

libvirt's own test driver (test:///default, no daemon) gives the real virConnect objects; the dead
connection is a stand-in whose isAlive answers only once every thread asks (so all of them have seen
it dead before any reconnects: the race, made certain) and then fails as libvirt does after a restart."""

from __future__ import annotations

import threading

import libvirt

from kvm_borg.engine import connection as connection_module
from kvm_borg.engine.connection import Connection

URI = "test:///default"


def test_a_live_connection_is_kept():
    connection = Connection(URI)
    try:
        first = connection.conn
        assert connection.reconnect_if_dead() is False and connection.conn is first
    finally:
        connection.close()


def test_threads_that_notice_the_same_restart_reconnect_once_and_share_the_new_connection(monkeypatch):
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
    connection = Connection(URI)
    opened = []
    real_open = libvirt.open

    def counting_open(uri):
        conn = real_open(uri)
        opened.append(conn)
        return conn

    monkeypatch.setattr(connection_module.libvirt, "open", counting_open)
    barrier = threading.Barrier(4)
    closes = []

    class DeadConnection:
        def isAlive(self):
            barrier.wait(10)
            raise libvirt.libvirtError("internal error: client socket is closed")

        def close(self):
            closes.append(self)

    connection.conn.close()
    connection.conn = DeadConnection()  # "libvirtd restarted"
    answers = []

    def notice():
        answers.append(connection.reconnect_if_dead())

    threads = [threading.Thread(target=notice) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    try:
        assert answers == [True] * 4  # every thread learns the connection was reopened
        assert len(opened) == 1 and connection.conn is opened[0] and len(closes) == 1
        assert connection.conn.isAlive() and connection.conn.getLibVersion() > 0  # not closed by a second thread
        assert connection.reconnect_if_dead() is False
    finally:
        connection.close()
