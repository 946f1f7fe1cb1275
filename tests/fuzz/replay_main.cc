// main() for the fuzz targets when they are not linked with libFuzzer (gcc, plain `bazel test`):
// runs every file named on the command line (or found in a named directory) through
// LLVMFuzzerTestOneInput, then a fixed set of mutations of each (every prefix, every byte
// flipped), so the ordinary and sanitizer test runs exercise the decoders' rejection paths too.
#include <dirent.h>
#include <sys/stat.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size);

namespace {

std::vector<std::string> ExpandPaths(int argc, char** argv) {
  std::vector<std::string> files;
  for (int i = 1; i < argc; ++i) {
    std::string path = argv[i];
    if (!path.empty() && path[0] == '-') continue;  // libFuzzer-style flags: ignored here
    struct stat st;
    if (stat(path.c_str(), &st) != 0) {
      std::fprintf(stderr, "replay: cannot stat %s\n", path.c_str());
      std::exit(2);
    }
    if (!S_ISDIR(st.st_mode)) {
      files.push_back(path);
      continue;
    }
    DIR* dir = opendir(path.c_str());
    if (dir == nullptr) continue;
    while (dirent* entry = readdir(dir)) {
      if (entry->d_name[0] != '.') files.push_back(path + "/" + entry->d_name);
    }
    closedir(dir);
  }
  return files;
}

void Run(const std::vector<uint8_t>& input) { LLVMFuzzerTestOneInput(input.data(), input.size()); }

}  // namespace

int main(int argc, char** argv) {
  std::vector<std::string> files = ExpandPaths(argc, argv);
  if (files.empty()) {
    std::fprintf(stderr, "replay: no corpus files given\n");
    return 2;
  }
  size_t runs = 0;
  for (const std::string& file : files) {
    std::ifstream in(file, std::ios::binary);
    std::vector<uint8_t> seed((std::istreambuf_iterator<char>(in)),
                              std::istreambuf_iterator<char>());
    Run(seed);
    ++runs;
    // Every prefix up to 1 KiB, then every 61st (truncation at any point of any structure).
    for (size_t n = 0; n < seed.size(); n += n < 1024 ? 1 : 61) {
      Run(std::vector<uint8_t>(seed.begin(), seed.begin() + n));
      ++runs;
    }
    // Every byte (of the first 1 KiB, then every 61st) flipped and set to 0xff: padding, counts,
    // sizes and ids each get a wrong value.
    for (size_t i = 0; i < seed.size(); i += i < 1024 ? 1 : 61) {
      for (uint8_t value : {static_cast<uint8_t>(seed[i] ^ 0x01), uint8_t{0xff}}) {
        std::vector<uint8_t> mutated = seed;
        mutated[i] = value;
        Run(mutated);
        ++runs;
      }
    }
  }
  std::printf("replay: %zu corpus files, %zu inputs, no crash\n", files.size(), runs);
  return 0;
}
