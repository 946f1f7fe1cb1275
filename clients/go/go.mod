// The Go client of kvmid's API: the kvmi/v1 stubs (generated from proto/kvmi/v1 by build.sh,
// never committed), the kvmimem helpers (memory dumps) and the kvmi-client example. Builds
// offline against Debian's Go packages: build.sh (GOFLAGS=-mod=mod, GOPROXY=off, every module of
// the graph replaced by Debian's copy under /usr/share/gocode/src, or by an empty stand-in when
// nothing imports its packages).
module github.com/kvmid/kvmid/clients/go

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)
