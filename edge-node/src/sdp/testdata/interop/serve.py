"""Serves chrome_page.html on loopback and runs the edge's SDP code for it.

usage: serve.py PORT TEST_BINARY OUT_DIR   (prints one line per result; exits on /done)
"""
import http.server, os, subprocess, sys, tempfile

PORT, BIN, OUT = int(sys.argv[1]), sys.argv[2], sys.argv[3]
HERE = os.path.dirname(os.path.abspath(__file__))


def edge(mode, body):
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.sdp"), os.path.join(d, "out.txt")
        open(src, "wb").write(body)
        env = dict(os.environ, KCS_SDP_MODE=mode, KCS_SDP_IN=src, KCS_SDP_OUT=dst)
        subprocess.run([BIN, "sdp::interop::interop_step", "--ignored", "--exact", "--quiet"],
                       env=env, check=True, capture_output=True, timeout=60)
        return open(dst, "rb").read()


class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open(os.path.join(HERE, "chrome_page.html"), "rb").read()
        self.send_response(200); self.send_header("Content-Type", "text/html"); self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        data = self.rfile.read(int(self.headers["Content-Length"]))
        kind, _, name = self.path.strip("/").partition("/")
        reply = b""
        if kind == "rust":
            reply = edge(name, data)
        elif kind == "save":
            open(os.path.join(OUT, os.path.basename(name)), "wb").write(data)
        elif kind == "result":
            print(data.decode(), flush=True)
        self.send_response(200); self.end_headers(); self.wfile.write(reply)
        if kind == "done":
            print("done", data.decode(), flush=True)
            os._exit(0)

    def log_message(self, *a):
        pass


http.server.HTTPServer(("127.0.0.1", PORT), H).serve_forever()
