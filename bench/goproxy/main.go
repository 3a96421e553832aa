// A reverse proxy from Go's standard library, the data plane of llama-swap and many small
// gateways: bench/run.py builds it with `go build` and measures it beside nginx and Hestia.
//
//	goproxy LISTEN_ADDR UPSTREAM_URL
package main

import (
	"log"
	"net/http"
	"net/http/httputil"
	"net/url"
	"os"
)

func main() {
	target, err := url.Parse(os.Args[2])
	if err != nil {
		log.Fatal(err)
	}
	proxy := httputil.NewSingleHostReverseProxy(target)
	// as many idle upstream connections as nginx's `keepalive 64` (the default keeps 2)
	transport := http.DefaultTransport.(*http.Transport).Clone()
	transport.MaxIdleConnsPerHost = 64
	proxy.Transport = transport
	log.Fatal(http.ListenAndServe(os.Args[1], proxy))
}
