import http.server, sys, os
OUT = sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = open(os.path.join(os.path.dirname(__file__), sys.argv[3]), 'rb').read()
        self.send_response(200); self.send_header('Content-Type', 'text/html'); self.end_headers(); self.wfile.write(body)
    def do_POST(self):
        n = int(self.headers['Content-Length']); data = self.rfile.read(n)
        name = self.path.rsplit('/', 1)[1]
        self.send_response(200); self.end_headers()
        if name in ('done', 'error'):
            print(name, data.decode(), flush=True)
            os._exit(0)
        open(os.path.join(OUT, name), 'wb').write(data); print('wrote', name, flush=True)
    def log_message(self, *a): pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
