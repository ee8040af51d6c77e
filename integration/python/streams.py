# docker-py against berth's exec and attach streams, kill and the restarting state
# (integration/tests/dockerpy_streams.rs runs this with DOCKER_HOST set to a stack).
import os
import socket
import struct
import time

import docker
import websocket

client = docker.from_env(version="auto")
api = client.api
SOCK = os.environ["DOCKER_HOST"][len("unix://"):]


def until(what, pred, limit=30):
    """pred() until it is truthy (returned), or fail naming `what` after `limit` seconds."""
    deadline = time.time() + limit
    while True:
        v = pred()
        if v:
            return v
        assert time.time() < deadline, "timed out waiting for " + what
        time.sleep(0.05)


def frames(data):
    """stdcopy frames -> [(stream, payload)]."""
    out = []
    while len(data) >= 8:
        stream, n = data[0], struct.unpack(">I", data[4:8])[0]
        out.append((stream, data[8:8 + n]))
        data = data[8 + n:]
    return out


def read_until_eof(s):
    buf = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return buf
        buf += chunk


# The log replay's order is the processes' order: the sleeps keep stdout and stderr apart.
ctr = client.containers.run(
    "busybox",
    ["sh", "-c", "echo out1; sleep 0.2; echo err1 >&2; sleep 0.2; echo out2; exec sleep 1000"],
    detach=True,
)
others = []
try:
    until("the container's output", lambda: b"out2" in ctr.logs())

    # 100 of 100: docker-py reads the 101 through a buffered reader, then the raw socket.
    for i in range(100):
        r = ctr.exec_run(["sh", "-c", "echo hello; echo world >&2"], demux=True)
        assert r.exit_code == 0 and r.output == (b"hello\n", b"world\n"), (i, r)
    for i in range(100):
        out = ctr.attach(logs=True, stream=False)
        assert out == b"out1\nerr1\nout2\n", (i, out)
    for i in range(100):
        out = ctr.attach(logs=True, stream=False, stdout=True, stderr=True)
        assert out == b"out1\nerr1\nout2\n", (i, out)
    out = ctr.attach(logs=True, stream=False, stdout=True, stderr=False)
    assert out == b"out1\nout2\n", out

    # A pty has Docker's terminal settings: onlcr.
    r = ctr.exec_run(["echo", "hi"], tty=True)
    assert r == (0, b"hi\r\n"), r
    # The pty is the create's; the start's Tty only picks the framing, as in Docker.
    e = api.exec_create(ctr.id, ["echo", "framed"], tty=True)
    out = api.exec_start(e, tty=False)
    assert out == b"framed\r\n", out
    e = api.exec_create(ctr.id, ["sh", "-c", "echo raw; echo dropped >&2"], tty=False)
    res = api._post_json(api._url("/exec/{0}/start", e["Id"]),
                         headers={"Connection": "Upgrade", "Upgrade": "tcp"},
                         data={"Tty": True, "Detach": False}, stream=True)
    assert res.status_code == 101, res.status_code
    assert res.headers["Content-Type"] == "application/vnd.docker.raw-stream", res.headers
    out = read_until_eof(api._get_raw_response_socket(res)._sock)
    assert out == b"raw\n", out

    # A command that cannot run: 101, Docker's error on the stream, 127/126 in inspect.
    r = ctr.exec_run(["nope"])
    assert r.exit_code == 127, r
    assert r.output == (b"OCI runtime exec failed: exec failed: unable to start container "
                        b"process: exec: \"nope\": executable file not found in $PATH: "
                        b"unknown\r\n"), r.output
    r = ctr.exec_run(["/etc/passwd"])
    assert r.exit_code == 126 and b"permission denied" in r.output, r
    e = api.exec_create(ctr.id, ["nope"])
    api.exec_start(e)
    i = api.exec_inspect(e)
    assert i["ExitCode"] == 127 and i["Running"] is False, i
    e = api.exec_create(ctr.id, ["nope"])
    try:
        api.exec_start(e, detach=True)
        raise AssertionError("a detached start of a missing command succeeded")
    except docker.errors.APIError as err:
        assert err.status_code == 400, err
        assert "executable file not found in $PATH" in str(err), err
    i = api.exec_inspect(e)
    assert i["ExitCode"] == 127 and i["Running"] is False, i

    # Detach keys: the create's, else ctrl-p,ctrl-q; the process keeps running.
    for keys, seq in ((None, b"\x10\x11"), ("ctrl-x,y", b"\x18y")):
        e = api.exec_create(ctr.id, ["cat"], stdin=True, detach_keys=keys)
        s = api.exec_start(e, socket=True)._sock
        s.sendall(b"abc\n")
        got = b""
        while b"abc\n" not in b"".join(p for _, p in frames(got)):
            chunk = s.recv(4096)
            assert chunk, got
            got += chunk
        s.sendall(seq)
        assert read_until_eof(s) == b"", "output after the detach keys"
        s.close()
        i = api.exec_inspect(e)
        assert i["Running"] is True and i["Pid"] > 0 and i["ExitCode"] is None, i

    # Kill (SIGKILL) returns once the exit is recorded.
    for n in range(5):
        c = client.containers.run("busybox", ["sleep", "1000"], detach=True)
        others.append(c)
        c.kill()
        state = api.inspect_container(c.id)["State"]
        assert state["Running"] is False and state["ExitCode"] == 137, (n, state)
        assert state["Status"] == "exited", (n, state)

    # Restarting: seen between an exit and the restart, not removable without force.
    c = client.containers.run("busybox", ["sh", "-c", "sleep 0.3; exit 3"], detach=True,
                              restart_policy={"Name": "on-failure"})
    others.append(c)
    refused = None
    deadline = time.time() + 60
    while refused is None:
        assert time.time() < deadline, "never saw the container restarting"
        row = api.containers(all=True, filters={"id": c.id})[0]
        if row["State"] != "restarting":
            time.sleep(0.02)
            continue
        assert row["Status"].startswith("Restarting (3) "), row
        state = api.inspect_container(c.id)["State"]
        if state["Status"] == "restarting":
            assert state["Restarting"] is True and state["ExitCode"] == 3, state
        try:
            c.remove()
            raise AssertionError("a restarting container was removed without force")
        except docker.errors.APIError as err:
            if "container is restarting" in str(err):
                refused = err
    assert refused.status_code == 409, refused
    assert str(refused.explanation) == (
        'cannot remove container "%s": container is restarting: stop the container before '
        "removing or force remove" % c.id), refused.explanation
    c.remove(force=True)
    try:
        client.containers.get(c.id)
        raise AssertionError("still there after a forced removal")
    except docker.errors.NotFound:
        pass
    others.remove(c)

    # Websocket attach: stdin from text and binary messages, output in binary messages.
    w = client.containers.run("busybox", ["sh", "-c", "echo ready; while read l; do echo got:$l; "
                                          "echo err:$l >&2; done"], detach=True, stdin_open=True)
    others.append(w)
    until("the reader", lambda: b"ready" in w.logs())

    def ws(query):
        s = socket.socket(socket.AF_UNIX)
        s.connect(SOCK)
        return websocket.create_connection(
            "ws://localhost/v1.45/containers/%s/attach/ws?%s" % (w.id, query), socket=s)

    conn = ws("stdin=1&stdout=1&stderr=1&stream=1")
    conn.send_binary(b"one\n")
    conn.send("two\n")
    got = b""
    while b"got:two\n" not in got or b"err:two\n" not in got:
        opcode, data = conn.recv_data()
        assert opcode == websocket.ABNF.OPCODE_BINARY, (opcode, data)
        got += data
    assert got.count(b"got:one\n") == 1 and got.count(b"err:one\n") == 1, got
    conn.close()
    conn = ws("logs=1&stdout=1&stream=0")
    got = b""
    while True:
        opcode, data = conn.recv_data()
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            break
        got += data
    assert got == b"ready\ngot:one\ngot:two\n", got
    try:
        api.get(api._url("/containers/nope-nope/attach/ws")).raise_for_status()
        raise AssertionError("attach/ws of a missing container answered")
    except Exception as err:
        assert "404" in str(err), err
finally:
    for c in others + [ctr]:
        try:
            c.remove(force=True)
        except docker.errors.NotFound:
            pass
print("ok")
