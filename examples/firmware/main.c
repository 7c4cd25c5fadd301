/*
 * A firmware-style program around an edgeprune C package: classify one image that is compiled into the binary.
 * No heap, no files: the package runs over its static arena, the image is const data (image.h, made by
 * make_image.py), and the result goes out on stdout (on a board, your UART).
 */
#include <stdio.h>

#include "image.h"
#include "net.h"

static float scores[NET_OUTPUT_SIZE];

int main(void) {
  int rc = net_run(image, scores);
  if (rc != 0) {
    printf("inference failed at kernel %d: %s\n", rc, net_last_error());
    return 1;
  }
  int best = 0;
  for (int i = 1; i < NET_OUTPUT_SIZE; ++i)
    if (scores[i] > scores[best]) best = i;
  printf("class %d score %.6f (model %s, arena %d bytes, weights %d bytes)\n", best, scores[best], NET_BUILD_ID,
         NET_ARENA_BYTES, NET_WEIGHT_BYTES);
  return 0;
}
